"""Segmentation metrics: a streaming confusion matrix and mIoU."""

from __future__ import annotations

import numpy as np
import torch


def bincount_skipping(values: torch.Tensor, skip: torch.Tensor, size: int) -> torch.Tensor:
    """Counts of ``values`` in ``[0, size)`` leaving out entries where ``skip`` is true. -> [size] int64

    Skipped entries go to one extra bin that is dropped: no boolean gather, one pass.
    """
    idx = torch.where(skip, size, values.long()).reshape(-1)
    return torch.bincount(idx, minlength=size + 1)[:size]


class ConfusionMatrix:
    """Accumulates a [C, C] confusion matrix (rows: ground truth, columns: prediction)."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        """Add a batch. Shape: pred, gt [...] integer; ``ignore_index`` in gt or pred is skipped."""
        c = self.num_classes
        pred, gt = pred.long(), gt.long()
        skip = (gt == self.ignore_index) | (pred == self.ignore_index)
        self.matrix += bincount_skipping(gt * c + pred, skip, c * c).view(c, c)

    def iou(self) -> np.ndarray:
        """Per-class IoU [C]; NaN for a class absent from both ground truth and prediction."""
        m = self.matrix.double()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        out = tp / union
        out[union == 0] = float("nan")
        return out.numpy()

    def precision(self) -> np.ndarray:
        """Per-class precision [C]: correct over predicted; NaN where nothing was predicted."""
        m = self.matrix.double()
        predicted = m.sum(0)
        out = m.diag() / predicted
        out[predicted == 0] = float("nan")
        return out.numpy()

    def accuracy(self) -> float:
        total = int(self.matrix.sum())
        return float(self.matrix.diag().sum()) / total if total else float("nan")


def miou(pred, gt, num_classes: int, ignore_index: int = 255) -> tuple[float, np.ndarray]:
    """Mean IoU over the classes present in ground truth or prediction, and per-class IoU [C]."""
    cm = ConfusionMatrix(num_classes, ignore_index)
    cm.update(torch.as_tensor(np.asarray(pred)), torch.as_tensor(np.asarray(gt)))
    per_class = cm.iou()
    return float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan"), per_class
