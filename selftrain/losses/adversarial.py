"""Adversarial alignment terms: DANN on a feature map, AdaptSegNet's output-space discriminator, and
the background score regularisation (BSR) of Kim et al. (ICCV 2019).

Each term returns its unweighted losses for the model (``forward``); the recipe weight is applied once,
by :class:`~selftrain.losses.terms.LossTerms`. A discriminator learns either through a gradient
reversal layer inside ``forward`` (DANN), or from its own losses on detached outputs
(``discriminator_losses``, AdaptSegNet); BSR has no discriminator, the detector's classifier plays it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from itertools import pairwise
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..training import OPTIMISERS, OptimSpec, make_optimizer
from ..types import StepBatch
from .grl import ganin_coeff, grad_reverse, reverse_gradient
from .registry import LOSSES

SOURCE, TARGET = 0.0, 1.0  # domain labels of the discriminators (AdaptSegNet's convention)


class LossTerm(nn.Module):
    """Base of the extra loss terms.

    ``needs``: what the engine must hand over in the :class:`StepBatch`: ``"source"`` / ``"target"``
    (the step's forward outputs of that domain) and ``"target_images"`` (for a term that makes its own
    forward pass). ``tasks``: the tasks it works for. ``separate_discriminator``: its discriminator
    learns from ``discriminator_losses`` on the step's detached outputs (else from ``forward``, through a GRL).
    """

    name: ClassVar[str] = ""
    needs: frozenset[str] = frozenset()
    tasks: tuple[str, ...] = ("segmentation", "detection")
    separate_discriminator = False
    default_optim: ClassVar[dict[str, Any]] = {"name": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4}

    def __init__(self, *, optim: dict[str, Any] | None = None) -> None:
        super().__init__()
        valid = ("name", "lr", "momentum", "weight_decay", "betas")
        unknown = set(optim or {}) - set(valid)
        if unknown:
            raise ValueError(f"unknown optim key {min(unknown)}; valid: {', '.join(valid)}")
        self.optim = OptimSpec(**{**self.default_optim, **(optim or {})})
        if self.optim.name not in OPTIMISERS:
            raise ValueError(f"unknown optim name {self.optim.name!r}; choose {', '.join(OPTIMISERS)}")

    def attach(self, adapter: Any, task: str) -> None:
        """Check that the model offers what the term needs (raise ConfigError) and build its layers."""
        if task not in self.tasks:
            raise ConfigError(f"loss {self.name} works for {' and '.join(self.tasks)}, not {task}")

    def discriminator_losses(self, step: StepBatch) -> dict[str, torch.Tensor]:
        return {}

    def make_optimizer(self) -> torch.optim.Optimizer | None:
        """The discriminator's own optimiser (``optim`` option), or None for a term without parameters."""
        params = [p for p in self.parameters() if p.requires_grad]
        return make_optimizer(params, self.optim) if params else None


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


def _taps(adapter: Any) -> dict[str, int]:
    return adapter.feature_channels()


# --------------------------------------------------------------------------- DANN


@LOSSES.register("dann", task="detection")
class DANN(LossTerm):
    """Domain-adversarial training (Ganin & Lempitsky 2015) on one feature map.

    A fully convolutional domain classifier (1x1 conv -> ReLU -> 1x1 conv, the image-level
    discriminator of DA Faster R-CNN) labels every location of the map source (0) or target (1);
    the loss is the mean binary cross-entropy over the locations of both domains. It reads the map
    through a GRL whose coefficient follows ``2 / (1 + exp(-gamma p)) - 1`` (``schedule: ganin``,
    p = training progress) or stays ``coeff`` (``schedule: constant``). The WST paper's DANN baseline
    for SSD aligns ``conv4_3`` (relu4_3); Faster R-CNN adapters offer ``backbone.0`` ... ``backbone.N``.
    """

    name = "dann"
    needs = frozenset({"source", "target"})
    tasks = ("detection",)  # segmenters expose no feature taps; output_space aligns them

    def __init__(self, *, tap: str = "conv4_3", hidden: int = 256, coeff: float = 1.0,
                 schedule: str = "ganin", gamma: float = 10.0, optim: dict[str, Any] | None = None) -> None:
        super().__init__(optim=optim)
        if schedule not in ("ganin", "constant"):
            raise ValueError(f"unknown schedule {schedule!r}; choose ganin or constant")
        self.tap, self.hidden, self.coeff, self.schedule, self.gamma = tap, hidden, coeff, schedule, gamma
        self.discriminator: nn.Module | None = None

    def attach(self, adapter: Any, task: str) -> None:
        super().attach(adapter, task)
        taps = _taps(adapter)
        if self.tap not in taps:
            offered = ", ".join(taps) or "none"
            raise ConfigError(f"loss dann: the model has no feature tap {self.tap!r} (it offers: {offered}); "
                              "set the loss's options.tap to one of them")
        self.discriminator = nn.Sequential(nn.Conv2d(taps[self.tap], self.hidden, 1), nn.ReLU(inplace=True),
                                           nn.Conv2d(self.hidden, 1, 1))

    def current_coeff(self, progress: float) -> float:
        return self.coeff * (ganin_coeff(progress, self.gamma) if self.schedule == "ganin" else 1.0)

    def forward(self, step: StepBatch) -> dict[str, torch.Tensor]:
        coeff = self.current_coeff(step.progress)
        terms = []
        for outputs, label in ((step.source, SOURCE), (step.target, TARGET)):
            logits = self.discriminator(grad_reverse(outputs.features[self.tap].float(), coeff))
            terms.append(F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label)))
        return {"domain": (terms[0] + terms[1]) / 2}


# --------------------------------------------------------------------------- output space


@LOSSES.register("output_space", task="segmentation")
class OutputSpace(LossTerm):
    """Output-space adaptation (Tsai et al., CVPR 2018, AdaptSegNet), single level.

    A fully convolutional discriminator (five 4x4 stride-2 convolutions, 64-128-256-512-1 channels,
    leaky ReLU 0.2) sees the softmax of the segmentation output at input resolution. The model's
    loss is ``BCE(D(P_t), source)``: target predictions should look like source ones (the paper's
    lambda_adv = 0.001 is the recipe weight). The discriminator then learns, on detached outputs,
    ``(BCE(D(P_s), source) + BCE(D(P_t), target)) / 2`` with Adam (lr 1e-4, betas 0.9/0.99). As in
    the official code, D's parameters take no gradient from the model's loss.
    """

    name = "output_space"
    needs = frozenset({"source", "target"})
    tasks = ("segmentation",)
    separate_discriminator = True
    default_optim: ClassVar[dict[str, Any]] = {"name": "adam", "lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0}

    def __init__(self, *, ndf: int = 64, optim: dict[str, Any] | None = None) -> None:
        super().__init__(optim=optim)
        self.ndf = ndf
        self.discriminator: nn.Module | None = None

    def attach(self, adapter: Any, task: str) -> None:
        super().attach(adapter, task)
        channels = [adapter.num_classes, self.ndf, self.ndf * 2, self.ndf * 4, self.ndf * 8]
        layers: list[nn.Module] = []
        for cin, cout in pairwise(channels):
            layers += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        self.discriminator = nn.Sequential(*layers, nn.Conv2d(channels[-1], 1, 4, stride=2, padding=1))

    def _bce(self, logits: torch.Tensor, label: float) -> torch.Tensor:
        out = self.discriminator(logits.float().softmax(1))
        return F.binary_cross_entropy_with_logits(out, torch.full_like(out, label))

    def forward(self, step: StepBatch) -> dict[str, torch.Tensor]:
        with frozen(self.discriminator):  # the model's loss trains the segmenter, never D
            return {"adv": self._bce(step.target.logits, SOURCE)}

    def discriminator_losses(self, step: StepBatch) -> dict[str, torch.Tensor]:
        return {"d": (self._bce(step.source.logits.detach(), SOURCE) + self._bce(step.target.logits.detach(), TARGET)) / 2}


# --------------------------------------------------------------------------- BSR


def bsr_loss(log_probs: torch.Tensor, *, t: float = 0.5, gamma: float = 2.0, neg_ratio: int = 3) -> torch.Tensor:
    """Adversarial background score regularisation, Kim et al. 2019, Eq. 7, with its example selection.

    All examples of the batch are sorted by background score p_i(0|x) ascending and the lowest
    ``neg_ratio * N`` kept, N = the number predicted as foreground (argmax != 0); over them
    ``-t |t - p|^gamma log p - (1 - t) |t - p|^gamma log(1 - p)``, summed and divided by N (SSD's
    normalisation of its confidence loss). No example predicted as foreground: 0.

    Shape: log_probs [M, K + 1] log-softmax of every example (column 0 = background) -> scalar.
    """
    log_p0 = log_probs[:, 0]
    n = int((log_probs.argmax(1) != 0).sum())
    if n == 0:
        return log_probs.sum() * 0.0
    keep = log_p0.detach().argsort()[: min(neg_ratio * n, len(log_p0))]
    log_bg = log_p0[keep]
    log_fg = torch.logsumexp(log_probs[keep, 1:], dim=1)  # log(1 - p0), exact where p0 -> 1
    focal = (t - log_bg.exp()).abs() ** gamma
    return -(t * focal * log_bg + (1 - t) * focal * log_fg).sum() / n


@LOSSES.register("bsr", task="detection")
class BSR(LossTerm):
    """Background score regularisation for SSD (Kim et al., ICCV 2019, Sec. 3.3), t = 0.5, gamma = 2.

    A second forward pass of the step's target images runs with a gradient reversal layer where the
    first detection map leaves the trunk (after relu4_3 in SSD300, as the paper; ``trunk_end`` of
    the adapter): the layers after it (the classifier C) minimise :func:`bsr_loss`, pushing target
    background scores towards t, and the layers up to it (F) maximise it, making target features
    that C can tell apart. The reversal acts on this pass only, so the step's other target losses
    (WST pseudo-labels) train F as usual. No discriminator of its own.
    """

    name = "bsr"
    needs = frozenset({"target_images"})
    tasks = ("detection",)

    def __init__(self, *, t: float = 0.5, gamma: float = 2.0, neg_ratio: int = 3, coeff: float = 1.0,
                 optim: dict[str, Any] | None = None) -> None:
        super().__init__(optim=optim)
        if not 0.0 < t < 1.0 or gamma < 0 or neg_ratio < 1:
            raise ValueError("t must be in (0, 1), gamma >= 0 and neg_ratio >= 1")
        self.t, self.gamma, self.neg_ratio, self.coeff = t, gamma, neg_ratio, coeff

    def attach(self, adapter: Any, task: str) -> None:
        super().attach(adapter, task)
        if not adapter.dense_logits:  # SSD: one logit row per default box, and its trunk_end()
            raise ConfigError("loss bsr needs a one-stage detector (ssd300_vgg16, tiny_ssd); "
                              "remove it or change model.name")

    def forward(self, step: StepBatch) -> dict[str, torch.Tensor]:
        with reverse_gradient(step.adapter.trunk_end(), self.coeff):
            logits = step.adapter.forward_train(step.target_images).logits
        log_probs = logits.float().flatten(0, -2).log_softmax(-1)
        return {"bsr": bsr_loss(log_probs, t=self.t, gamma=self.gamma, neg_ratio=self.neg_ratio)}
