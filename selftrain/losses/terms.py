"""A run's extra loss terms: which phase each acts in, its weight, and its discriminator's optimiser."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

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
    """Applies every term's weight once, and steps the discriminators after the model's step.

    A term whose discriminator learns through a GRL (DANN) has its gradients from the model's
    backward pass; one with ``separate_discriminator`` (AdaptSegNet) has them cleared and recomputed
    from ``discriminator_losses`` on detached outputs. Each discriminator has its own optimiser.
    """

    def __init__(self, entries: Sequence[WeightedTerm] = ()) -> None:
        self.entries = list(entries)
        self.optimizers: list[torch.optim.Optimizer | None] = [None] * len(self.entries)
        self._sums: dict[str, float] = {}
        self._count = 0

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

    def discriminator_step(self, step: StepBatch, phase: str) -> None:
        for e, opt in zip(self.entries, self.optimizers):
            if phase not in e.phases or opt is None:
                continue
            if e.term.separate_discriminator:
                opt.zero_grad(set_to_none=True)
                losses = e.term.discriminator_losses(step)
                sum(losses.values()).backward()
                for name, value in losses.items():
                    key = f"{e.key}/{name}"
                    self._sums[key] = self._sums.get(key, 0.0) + float(value.detach())
            opt.step()
            opt.zero_grad(set_to_none=True)
        self._count += 1

    def take_means(self) -> dict[str, float]:
        """Mean discriminator losses since the last call (for the round's record)."""
        out = {k: v / max(self._count, 1) for k, v in self._sums.items()}
        self._sums, self._count = {}, 0
        return out

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
