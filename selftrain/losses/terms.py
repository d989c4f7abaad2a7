"""A run's extra loss terms: which phase each acts in, its weight, its discriminator's optimiser and update."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..training import HookBase, LossMeter, StepResult, StepRunner
from ..types import StepBatch
from .adversarial import LossTerm

PHASES = ("source", "rounds")  # round 0 (source training) and the self-training rounds


@dataclass
class WeightedTerm:
    """One recipe entry: ``key`` prefixes its losses in the logs (``dann/domain``)."""

    key: str
    weight: float
    term: LossTerm
    phases: tuple[str, ...] = PHASES


class LossTerms:
    """Applies every term's weight once, and owns each discriminator's optimiser.

    A term whose discriminator learns through a GRL (DANN) gets its gradients from the model's
    backward pass; one with ``separate_discriminator`` (AdaptSegNet) learns from
    ``discriminator_losses`` on detached outputs (its ``forward`` keeps the discriminator's
    parameters out of the model's graph). :class:`DiscriminatorUpdate` is the step hook that runs
    those updates.
    """

    def __init__(self, entries: Sequence[WeightedTerm] = ()) -> None:
        self.entries = list(entries)
        self.optimizers: list[torch.optim.Optimizer | None] = [None] * len(self.entries)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def prepare(self, device: str) -> None:
        """Move the terms to ``device`` and make their optimisers (once)."""
        for i, e in enumerate(self.entries):
            e.term.to(device)
            if self.optimizers[i] is None:
                self.optimizers[i] = e.term.make_optimizer()

    def needs(self, phase: str) -> set[str]:
        return set().union(*(e.term.needs for e in self._active(phase))) if self.entries else set()

    def losses(self, step: StepBatch, phase: str) -> dict[str, torch.Tensor]:
        """The weighted losses of the terms active in ``phase``, named ``<key>/<loss>``."""
        out = {}
        for e in self._active(phase):
            e.term.train()
            for name, value in e.term(step).items():
                out[f"{e.key}/{name}"] = e.weight * value
        return out

    def discriminator_losses(self, step: StepBatch, phase: str) -> dict[str, torch.Tensor]:
        """The unweighted losses of the separate discriminators active in ``phase`` (``<key>/<loss>``)."""
        return {f"{e.key}/{name}": value for e in self._active(phase) if e.term.separate_discriminator
                for name, value in e.term.discriminator_losses(step).items()}

    def active_optimizers(self, phase: str) -> list[torch.optim.Optimizer]:
        return [o for e, o in zip(self.entries, self.optimizers) if phase in e.phases and o is not None]

    def state_dict(self) -> dict[str, Any]:
        return {"terms": [e.term.state_dict() for e in self.entries],
                "optimizers": [None if o is None else o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for e, s in zip(self.entries, state["terms"]):
            e.term.load_state_dict(s)
        for o, s in zip(self.optimizers, state["optimizers"]):
            if o is not None and s is not None:
                o.load_state_dict(s)

    def _active(self, phase: str) -> list[WeightedTerm]:
        return [e for e in self.entries if phase in e.phases]


class DiscriminatorUpdate(HookBase):
    """Step hook: after each micro-batch's backward, the separate discriminators' losses on the
    step's detached outputs are back-propagated through the runner's scaler; the discriminators'
    optimisers then step with the model's. Their losses are averaged for the round's record."""

    def __init__(self, terms: LossTerms, phase: str) -> None:
        self.terms, self.phase = terms, phase
        self.meter = LossMeter()

    def after_backward(self, runner: StepRunner, step: int, result: StepResult) -> None:
        with runner.autocast():
            losses = self.terms.discriminator_losses(result.batch, self.phase)
        if losses:
            runner.backward(sum(losses.values()))
            self.meter.add({k: v / runner.accumulate for k, v in losses.items()})

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return self.terms.active_optimizers(self.phase)

    def state_dict(self) -> dict[str, Any]:
        return self.meter.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.meter.load_state_dict(state)
