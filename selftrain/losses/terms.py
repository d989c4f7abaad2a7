"""A run's extra loss terms: which phase each acts in and from when, its weight, its optimisers and
their updates after each step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import dist
from ..training import HookBase, LossMeter, StepResult, StepRunner, lr_factor
from ..types import StepBatch
from .base import LossTerm, Update

PHASES = ("source", "rounds")  # round 0 (source training) and the self-training rounds


@dataclass
class WeightedTerm:
    """One recipe entry: ``key`` prefixes its losses in the logs (``dann/domain``); ``start`` in
    [0, 1]: the term acts from the first step whose progress (the fraction of its loss-term phase
    done, :attr:`StepBatch.progress`) reaches it, late launch as iFAN's instance terms."""

    key: str
    weight: float
    term: LossTerm
    phases: tuple[str, ...] = PHASES
    start: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.start <= 1.0:
            raise ValueError(f"start must be in [0, 1], got {self.start}")

    def active(self, phase: str, progress: float) -> bool:
        return phase in self.phases and progress >= self.start


class LossTerms:
    """Applies every term's weight once, logs the raw losses and the terms' records, and owns each
    term's optimisers (one per :class:`Update`, ``optimizers[i][name]``).

    Logged beside each weighted loss ``<key>/<loss>``: ``<key>/<loss>_raw`` (unweighted), what the
    term records (``<key>/acc_src``, ``<key>/acc_tgt``) and, for a late-launched term, ``<key>/active``
    (1 on the steps it acts; the phase's means count inactive steps as 0, so divide by it).
    """

    def __init__(self, entries: Sequence[WeightedTerm] = ()) -> None:
        self.entries = list(entries)
        self.updates: list[list[Update]] | None = None
        self.optimizers: list[dict[str, torch.optim.Optimizer]] = [{} for _ in self.entries]
        self.logged: dict[str, torch.Tensor] = {}

    def __bool__(self) -> bool:
        return bool(self.entries)

    def prepare(self, device: str) -> None:
        """Move the terms to ``device`` and make their updates and optimisers (once)."""
        for e in self.entries:
            e.term.to(device)
        if self.updates is None:
            self.updates = [e.term.updates() for e in self.entries]
            self.optimizers = [{u.name: u.make_optimizer() for u in ups} for ups in self.updates]

    def needs(self, phase: str) -> set[str]:
        return set().union(*(e.term.needs for e in self._in(phase))) if self.entries else set()

    def losses(self, step: StepBatch, phase: str) -> dict[str, torch.Tensor]:
        """The weighted losses of the terms active in ``phase`` at ``step.progress``, named ``<key>/<loss>``."""
        out = {}
        for e in self._in(phase):
            if e.start > 0:
                self.logged[f"{e.key}/active"] = torch.tensor(float(e.active(phase, step.progress)))
            if not e.active(phase, step.progress):
                continue
            e.term.train()
            for name, value in e.term(step).items():
                out[f"{e.key}/{name}"] = e.weight * value
                self.logged[f"{e.key}/{name}_raw"] = value.detach()
            self._take_metrics(e)
        return out

    @property
    def own_losses(self) -> bool:
        """Whether some update back-propagates a loss of its own (and so needs the step's outputs)."""
        return any(u.loss is not None for ups in self.updates or [] for u in ups)

    def take_logged(self) -> dict[str, torch.Tensor]:
        """What was logged since the last call (detached tensors, no host sync)."""
        out, self.logged = self.logged, {}
        return out

    def active_updates(self, phase: str, progress: float) -> list[tuple[WeightedTerm, Update, torch.optim.Optimizer]]:
        """The updates of the terms active at ``progress``, term by term, each term's in its order."""
        if self.updates is None:
            return []
        return [(e, u, self.optimizers[i][u.name]) for i, e in enumerate(self.entries) if e.active(phase, progress)
                for u in self.updates[i]]

    def phase_optimizers(self, phase: str) -> list[torch.optim.Optimizer]:
        return [o for i, e in enumerate(self.entries) if phase in e.phases for o in self.optimizers[i].values()]

    def state_dict(self) -> dict[str, Any]:
        return {"terms": [e.term.state_dict() for e in self.entries],
                "updates": [{k: o.state_dict() for k, o in opts.items()} for opts in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Also reads the older layout, ``optimizers``: one optimiser state (or None) per term."""
        for e, s in zip(self.entries, state["terms"]):
            e.term.load_state_dict(s)
        saved = state.get("updates")
        if saved is None:
            saved = [{} if s is None else {next(iter(opts), "d"): s}
                     for opts, s in zip(self.optimizers, state.get("optimizers", []))]
        for opts, states in zip(self.optimizers, saved):
            for name, s in states.items():
                if name in opts:
                    opts[name].load_state_dict(s)

    def _take_metrics(self, e: WeightedTerm) -> None:
        self.logged.update({f"{e.key}/{k}": v for k, v in e.term.take_metrics().items()})

    def _in(self, phase: str) -> list[WeightedTerm]:
        return [e for e in self.entries if phase in e.phases]


def sync_gradients(params: Sequence[nn.Parameter]) -> None:
    """The one place where a term's gradients are averaged over processes before its update, so
    every process's discriminators take the same step and stay identical (nothing in one process).
    Every process calls it for every update it runs, gradients or not, before deciding to skip."""
    dist.average_gradients(params)


class DiscriminatorUpdate(HookBase):
    """Step hook: after the model's optimiser step, the updates of the terms active in the step run
    in order, each zeroing, back-propagating (if it has a loss) and stepping its own optimiser.

    An update without a loss steps on the gradients the model's backward left in its parameters
    (zeroed before each step's forward). One with a loss back-propagates it on each micro-batch's
    stored :class:`StepBatch` (divided by ``accumulate``) through a GradScaler of its own. Under
    fp16 the first kind's gradients are unscaled by the runner's scale and the step is skipped when
    any is non-finite, as the GradScaler does. ``follow`` updates take ``optim.lr`` x the phase's
    :func:`lr_factor` at the step. The updates' losses and the terms' records are averaged into the
    round's record with the raw losses.
    """

    def __init__(self, terms: LossTerms, phase: str) -> None:
        self.terms, self.phase = terms, phase
        self.meter = LossMeter()
        self.batches: list[StepBatch] = []
        self.progress: float | None = None
        self.runner: StepRunner | None = None
        self.factor, self.scale = 1.0, None
        self.scalers: dict[str, torch.amp.GradScaler] = {}
        self._scaler_states: dict[str, Any] = {}

    def before_step(self, step: int) -> None:
        for opt in self.terms.phase_optimizers(self.phase):
            opt.zero_grad(set_to_none=True)

    def after_backward(self, runner: StepRunner, step: int, result: StepResult) -> None:
        self.runner = runner
        if result.batch is not None:
            self.progress = result.batch.progress
            if self.terms.own_losses:  # kept for the updates with a loss only (micro-batch outputs)
                self.batches.append(result.batch)
        self.factor = lr_factor(runner.scheduler)
        self.scale = runner.scaler.get_scale() if runner.scaler.is_enabled() else None
        self._add(self.terms.take_logged())

    def after_step(self, step: int, losses: dict[str, torch.Tensor]) -> None:
        batches, progress, self.batches, self.progress = self.batches, self.progress, [], None
        if progress is None or self.runner is None:
            return
        for e, update, opt in self.terms.active_updates(self.phase, progress):
            if update.schedule == "follow":
                for group in opt.param_groups:
                    group["lr"] = update.optim.lr * self.factor
            if update.loss is None:
                self._step_on_model_gradients(update, opt)
            else:
                self._step_on_own_loss(e, update, opt, batches)

    def _step_on_model_gradients(self, update: Update, opt: torch.optim.Optimizer) -> None:
        sync_gradients(update.params)  # first: a skip below is then the same decision on every process
        grads = [p.grad for p in update.params if p.grad is not None]
        if not grads:
            return
        if self.scale is not None:
            for g in grads:
                g.mul_(1.0 / self.scale)
            if not all(bool(torch.isfinite(g).all()) for g in grads):
                return
        opt.step()

    def _step_on_own_loss(self, e: WeightedTerm, update: Update, opt: torch.optim.Optimizer,
                          batches: list[StepBatch]) -> None:
        runner, scaler = self.runner, self._scaler(f"{e.key}/{update.name}")
        opt.zero_grad(set_to_none=True)
        for batch in batches:
            with runner.autocast():
                losses = update.loss(batch)
            if losses:
                scaler.scale(sum(losses.values()) / runner.accumulate).backward()
            self._add({f"{e.key}/{k}": v for k, v in losses.items()})
            self._add({f"{e.key}/{k}": v for k, v in e.term.take_metrics().items()})
        sync_gradients(update.params)
        if all(p.grad is None for p in update.params):
            return  # nothing to learn from this step (a GradScaler refuses an optimiser without gradients)
        scaler.step(opt)
        scaler.update()

    def _scaler(self, key: str) -> torch.amp.GradScaler:
        if key not in self.scalers:
            self.scalers[key] = self.runner.precision.scaler()
            if key in self._scaler_states:
                self.scalers[key].load_state_dict(self._scaler_states[key])
        return self.scalers[key]

    def _add(self, values: dict[str, torch.Tensor]) -> None:
        """Per micro-batch values into the meter, divided by ``accumulate`` (one step's mean)."""
        self.meter.add({k: v / self.runner.accumulate for k, v in values.items()})

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return []  # stepped here, after the model's, in the updates' order

    def state_dict(self) -> dict[str, Any]:
        scalers = {k: s.state_dict() for k, s in self.scalers.items() if s.is_enabled()}
        return {**self.meter.state_dict(), "scalers": {**self._scaler_states, **scalers}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.meter.load_state_dict(state)
        self._scaler_states = dict(state.get("scalers", {}))
