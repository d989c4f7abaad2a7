"""What every extra loss term shares: the base class, its optimiser updates, the domain labels.

A term returns its unweighted losses for the model (``forward``); the recipe weight is applied once,
by :class:`~selftrain.losses.terms.LossTerms`. Its own parameters (discriminators, generators) learn
through :class:`Update` s, run in order after the model's optimiser step: an update without a loss
steps on the gradients the model's backward pass left (a discriminator behind a gradient reversal
layer, DANN); one with a loss closure back-propagates that loss on the step's stored outputs first
(AdaptSegNet's discriminator; SCDA's D, Dw and G, each with its own optimiser).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..training import OPTIMISERS, OptimSpec, make_optimizer
from ..types import StepBatch

SOURCE, TARGET = 0.0, 1.0  # domain labels of the discriminators (AdaptSegNet's convention)
TERM_SCHEDULES = ("constant", "follow")  # a term optimiser's learning rate: fixed, or the phase's schedule
OPTIM_KEYS = ("name", "lr", "momentum", "weight_decay", "betas", "schedule")


@dataclass
class Update:
    """One optimiser step of some of a term's parameters, after the model's step.

    ``loss``: None when the parameters learn from the model's backward pass (through a GRL); else a
    closure ``loss(step) -> {name: tensor}`` on a stored :class:`StepBatch`, whose sum is
    back-propagated into ``params`` just before they step. It must read the step's outputs detached
    (the model's graph is gone by then) and may read parameters stepped by earlier updates. An
    update without a loss must come before any update whose loss reaches its parameters.
    ``schedule``: ``constant`` (``optim.lr`` throughout) or ``follow`` (``optim.lr`` times the
    phase's learning-rate factor at that step, see :func:`selftrain.training.lr_factor`).
    """

    name: str
    params: list[nn.Parameter]
    loss: Callable[[StepBatch], dict[str, torch.Tensor]] | None = None
    optim: OptimSpec = field(default_factory=OptimSpec)
    schedule: str = "constant"

    def __post_init__(self) -> None:
        if self.schedule not in TERM_SCHEDULES:
            raise ValueError(f"unknown optim schedule {self.schedule!r}; choose {' or '.join(TERM_SCHEDULES)}")

    def make_optimizer(self) -> torch.optim.Optimizer:
        return make_optimizer(self.params, self.optim)


class LossTerm(nn.Module):
    """Base of the extra loss terms.

    ``needs``: what the engine must hand over in the :class:`StepBatch`: ``"source"`` / ``"target"``
    (the step's forward outputs of that domain) and ``"target_images"`` (for a term that makes its own
    forward pass). ``tasks``: the tasks it works for. ``separate_discriminator``: its discriminator
    learns from ``discriminator_losses`` on the step's detached outputs (else from ``forward``, through
    a GRL). ``optim``: the options of its optimiser (``name``, ``lr``, ``momentum``, ``weight_decay``,
    ``betas``) and ``schedule``: ``constant`` (the default, a fixed learning rate) or ``follow``.
    A term with several optimisers overrides :meth:`updates`.
    """

    name: ClassVar[str] = ""
    needs: frozenset[str] = frozenset()
    tasks: tuple[str, ...] = ("segmentation", "detection")
    separate_discriminator = False
    default_optim: ClassVar[dict[str, Any]] = {"name": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4}
    default_schedule: ClassVar[str] = "constant"

    def __init__(self, *, optim: dict[str, Any] | None = None) -> None:
        super().__init__()
        optim = dict(optim or {})
        unknown = set(optim) - set(OPTIM_KEYS)
        if unknown:
            raise ValueError(f"unknown optim key {min(unknown)}; valid: {', '.join(OPTIM_KEYS)}")
        self.optim_schedule = optim.pop("schedule", self.default_schedule)
        if self.optim_schedule not in TERM_SCHEDULES:
            raise ValueError(f"unknown optim schedule {self.optim_schedule!r}; choose {' or '.join(TERM_SCHEDULES)}")
        self.optim = OptimSpec(**{**self.default_optim, **optim})
        if self.optim.name not in OPTIMISERS:
            raise ValueError(f"unknown optim name {self.optim.name!r}; choose {', '.join(OPTIMISERS)}")
        self.metrics: dict[str, torch.Tensor] = {}

    def attach(self, adapter: Any, task: str) -> None:
        """Check that the model offers what the term needs (raise ConfigError) and build its layers."""
        if task not in self.tasks:
            raise ConfigError(f"loss {self.name} works for {' and '.join(self.tasks)}, not {task}")

    def discriminator_losses(self, step: StepBatch) -> dict[str, torch.Tensor]:
        return {}

    def updates(self) -> list[Update]:
        """The term's optimiser updates in the order they run: by default one, ``d``, over every
        trainable parameter, from ``discriminator_losses`` when ``separate_discriminator`` else
        from the model's backward; none for a term without parameters (BSR)."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            return []
        loss = self.discriminator_losses if self.separate_discriminator else None
        return [Update("d", params, loss, self.optim, self.optim_schedule)]

    def record(self, **values: torch.Tensor) -> None:
        """Log ``values`` (detached; no host sync) beside the losses, as ``<key>/<name>``."""
        self.metrics.update({k: v.detach() for k, v in values.items()})

    def take_metrics(self) -> dict[str, torch.Tensor]:
        """What :meth:`record` gathered since the last call."""
        out, self.metrics = self.metrics, {}
        return out


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Ops inside the block record no gradient for ``module``'s parameters (gradients still flow
    through it to its inputs): AdaptSegNet's generator step with ``requires_grad = False`` on D."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def feature_taps(adapter: Any) -> dict[str, int]:
    """The adapter's named feature taps and their channels."""
    return adapter.feature_channels()
