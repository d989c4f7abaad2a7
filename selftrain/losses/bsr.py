"""Background score regularisation (BSR) of Kim et al., ICCV 2019, "Self-Training and Adversarial
Background Regularization for Unsupervised Domain Adaptive One-Stage Object Detection" (arXiv 1909.00597)."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from ..types import StepBatch
from .base import LossTerm
from .grl import reverse_gradient
from .registry import LOSSES


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
    (WST pseudo-labels) train F as usual. No discriminator of its own, so no update of its own.

    Weights: the recipe weight w multiplies :func:`bsr_loss` before the step's one backward pass: C
    gets w x its gradient, F gets -w x ``coeff`` x its gradient; ``coeff`` scales F's only.

    Shapes: target_images [B, 3, H, W] -> {"bsr": scalar}.
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
