"""Output-space adaptation (Tsai et al., CVPR 2018, AdaptSegNet, arXiv 1802.10349), single level."""

from __future__ import annotations

from itertools import pairwise
from typing import Any, ClassVar

import torch
from torch import nn

from ..types import StepBatch
from .base import SOURCE, TARGET, LossTerm, frozen
from .functional import bce_domain_loss, domain_accuracy
from .registry import LOSSES


@LOSSES.register("output_space", task="segmentation")
class OutputSpace(LossTerm):
    """A fully convolutional discriminator (five 4x4 stride-2 convolutions, 64-128-256-512-1 channels,
    leaky ReLU 0.2) sees the softmax of the segmentation output at input resolution. The model's
    loss is ``BCE(D(P_t), source)``: target predictions should look like source ones (the paper's
    lambda_adv = 0.001 is the recipe weight, which scales this loss only). The discriminator then
    learns, after the model's step on the step's detached outputs, ``(BCE(D(P_s), source) +
    BCE(D(P_t), target)) / 2`` unweighted, with Adam (lr 1e-4, betas 0.9/0.99). As in the official
    code, D's parameters take no gradient from the model's loss. Logged: ``adv``, ``d`` and D's
    per-domain accuracies ``acc_src``, ``acc_tgt`` in its own update.

    Shapes: logits [B, C, H, W] per domain -> {"adv": scalar}; discriminator_losses -> {"d": scalar}.
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

    def _d(self, logits: torch.Tensor) -> torch.Tensor:
        return self.discriminator(logits.float().softmax(1))

    def forward(self, step: StepBatch) -> dict[str, torch.Tensor]:
        with frozen(self.discriminator):  # the model's loss trains the segmenter, never D
            return {"adv": bce_domain_loss(self._d(step.target.logits), SOURCE)}

    def discriminator_losses(self, step: StepBatch) -> dict[str, torch.Tensor]:
        out_s, out_t = self._d(step.source.logits.detach()), self._d(step.target.logits.detach())
        self.record(acc_src=domain_accuracy(out_s, SOURCE), acc_tgt=domain_accuracy(out_t, TARGET))
        return {"d": (bce_domain_loss(out_s, SOURCE) + bce_domain_loss(out_t, TARGET)) / 2}
