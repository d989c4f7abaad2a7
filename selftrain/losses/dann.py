"""DANN (Ganin & Lempitsky, ICML 2015, arXiv 1409.7495) on one feature map of a detector."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..types import StepBatch
from .base import SOURCE, TARGET, LossTerm, feature_taps
from .functional import bce_domain_loss, domain_accuracy
from .grl import ganin_coeff, grad_reverse
from .registry import LOSSES


@LOSSES.register("dann", task="detection")
class DANN(LossTerm):
    """Domain-adversarial training on one feature map.

    A fully convolutional domain classifier (1x1 conv -> ReLU -> 1x1 conv, the image-level
    discriminator of DA Faster R-CNN) labels every location of the map source (0) or target (1);
    the loss is the mean binary cross-entropy over the locations of both domains. It reads the map
    through a GRL whose coefficient follows ``2 / (1 + exp(-gamma p)) - 1`` (``schedule: ganin``,
    p = training progress) or stays ``coeff`` (``schedule: constant``). The WST paper's DANN baseline
    for SSD aligns ``conv4_3`` (relu4_3); Faster R-CNN adapters offer ``backbone.0`` ... ``backbone.N``.

    Weights: the recipe weight w multiplies this loss before the step's one backward pass, so it
    scales both gradients: the classifier's own gradient by w, and the reversed gradient reaching
    the feature extractor by -w x coeff. ``coeff`` (and its schedule) scales the reversed gradient
    only. With w = 0 the classifier gets zero gradients (its optimiser still applies weight decay
    and momentum). The classifier steps with its own SGD (lr 1e-3, momentum 0.9, wd 5e-4) after the
    model's step. Logged: ``domain`` and per-domain accuracies ``acc_src``, ``acc_tgt``.

    Shapes: features[tap] [B, C, H, W] per domain -> {"domain": scalar}.
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
        taps = feature_taps(adapter)
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
        terms, accuracy = [], {}
        for outputs, label, key in ((step.source, SOURCE, "acc_src"), (step.target, TARGET, "acc_tgt")):
            logits = self.discriminator(grad_reverse(outputs.features[self.tap].float(), coeff))
            terms.append(bce_domain_loss(logits, label))
            accuracy[key] = domain_accuracy(logits, label)
        self.record(**accuracy)
        return {"domain": (terms[0] + terms[1]) / 2}
