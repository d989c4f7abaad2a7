"""Multi-scale and flipped inference (CBST's test protocol: scales 0.5, 0.75, 1.0 with flip).

Probabilities are averaged over the views and handed on as logits ``log(mean p)``, computed with
logsumexp from log-softmax so confident pixels keep their precise ``-log p`` (policies rank by it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .types import SegPrediction


@dataclass(frozen=True)
class TestTimeAugment:
    """Views to average: each scale, and each scale mirrored when ``flip``. (1.0,) without flip = one plain forward."""

    __test__ = False  # not a pytest class, despite its name

    scales: tuple[float, ...] = (1.0,)
    flip: bool = False

    def __post_init__(self) -> None:
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"scales must be positive numbers, got {self.scales}")

    @property
    def identity(self) -> bool:
        return tuple(self.scales) == (1.0,) and not self.flip

    def predict(self, adapter, images: torch.Tensor) -> SegPrediction:
        """Shape: images [B, 3, H, W] -> logits [B, C, H, W] (log of the mean probability over views)."""
        if self.identity:
            return adapter.predict(images)
        log_probs = [self._view(adapter, images, s, flip) for s in self.scales for flip in (False, True)[: 1 + self.flip]]
        stacked = torch.stack(log_probs)
        return SegPrediction(logits=torch.logsumexp(stacked, dim=0) - math.log(len(log_probs)))

    def _view(self, adapter, images: torch.Tensor, scale: float, flip: bool) -> torch.Tensor:
        size = images.shape[-2:]
        x = images if scale == 1.0 else F.interpolate(images, scale_factor=scale, mode="bilinear",
                                                      align_corners=False, recompute_scale_factor=False)
        x = x.flip(-1) if flip else x
        logits = adapter.predict(x).logits.float()
        logits = logits.flip(-1) if flip else logits
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return F.log_softmax(logits, dim=1)
