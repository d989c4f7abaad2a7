"""Offline pseudo-labelling of the target set: one network pass, then selection from a cache.

Pass 1 runs the teacher once over the target images, feeds the policy's streaming statistics and
writes the logits as float16 to a scratch file; ``policy.fit(portion, replay=...)`` sets the exact
thresholds (one or two more reads of the scratch file); pass 2 reads it back batch by batch,
selects and writes the round's HDF5 file. Host memory holds one batch at a time whatever the size
of the target set.

The scratch file holds the logits at the network's output stride, not at the input size
(19 x 128 x 256 x 2 B = 1.25 MB instead of 19 x 1024 x 2048 x 2 B = 79.7 MB for a Cityscapes image
through DeepLab-v2 at stride 8; ``benchmarks/logit_cache.py`` measures it). Every read upsamples them on the CPU with the adapter's
``upsample_logits`` (what ``predict`` does), so each pass sees the same full-size logits bit for
bit. With test-time augmentation each view is cached at its own output stride (scale s costs s^2
of the plain view) and the views are combined again on every read: the combination (a
log-softmax at the input size) cannot be taken before upsampling without changing the numbers.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .metrics import ConfusionMatrix, bincount_skipping
from .progress import progress
from .store import PseudoLabelWriter
from .training import collate
from .tta import TestTimeAugment
from .types import SegPrediction

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelingResult:
    """Per-class statistics of one round's pseudo-labels ([C] lists)."""

    thresholds: list[float]
    predicted_pixels: list[int]
    selected_pixels: list[int]
    precision: list[float | None] | None  # against target ground truth when the split has it
    selected_share: float
    precision_overall: float | None = None  # correct / selected over pixels with ground truth

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class LogitCache:
    """Append-only float16 scratch file of logit batches, read back in the same order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.shapes: list[tuple[int, ...]] = []

    def __enter__(self) -> "LogitCache":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "wb")
        return self

    def write(self, logits: torch.Tensor) -> torch.Tensor:
        """Store a batch; returns the float16-rounded logits so both passes see identical values."""
        half = logits.detach().to("cpu", torch.float16).contiguous()
        self._fh.write(half.numpy().tobytes())
        self.shapes.append(tuple(half.shape))
        return half.float()

    def __exit__(self, *exc: Any) -> None:
        self._fh.close()

    def read(self):
        with open(self.path, "rb") as fh:
            for shape in self.shapes:
                n = int(np.prod(shape))
                data = np.frombuffer(fh.read(n * 2), dtype=np.float16).reshape(shape)
                yield torch.from_numpy(data.astype(np.float32))

    @property
    def nbytes(self) -> int:
        """Bytes written so far."""
        return sum(2 * int(np.prod(shape)) for shape in self.shapes)

    def remove(self) -> None:
        if self.path.exists():
            os.remove(self.path)


class CacheRecorder:
    """The adapter as test-time augmentation sees it in pass 1: each view runs the network at its
    output stride, the float16 logits go to the cache, and the view gets them upsampled on the CPU
    exactly as :class:`CacheReplay` will upsample them when the cache is read back."""

    def __init__(self, adapter: Any, cache: LogitCache) -> None:
        self.adapter, self.cache = adapter, cache

    def predict(self, images: torch.Tensor) -> SegPrediction:
        native = self.cache.write(self.adapter.native_logits(images))
        return SegPrediction(logits=self.adapter.upsample_logits(native, images.shape[-2:]))


class CacheReplay:
    """The adapter as test-time augmentation sees it on a read of the cache: the next cached view,
    upsampled to the size the view asks for."""

    def __init__(self, adapter: Any, views: Iterator[torch.Tensor]) -> None:
        self.adapter, self.views = adapter, views

    def predict(self, images: torch.Tensor) -> SegPrediction:
        return SegPrediction(logits=self.adapter.upsample_logits(next(self.views), images.shape[-2:]))


def replay_logits(adapter: Any, tta: TestTimeAugment, cache: LogitCache,
                  sizes: list[tuple[int, ...]]) -> Iterator[torch.Tensor]:
    """Full-size logits [B, C, H, W] of each cached batch, computed as in pass 1.

    ``sizes`` holds each batch's image shape [B, 3, H, W]; test-time augmentation reads nothing of
    the images but their size outside ``predict``, so a zero-stride placeholder stands in for them.
    """
    views = cache.read()
    replay = CacheReplay(adapter, views)
    try:
        for shape in sizes:
            yield tta.predict(replay, torch.zeros(()).expand(*shape)).logits
    finally:
        views.close()


def label_target(
    *, adapter, policy, dataset: Dataset, portion: float, writer: PseudoLabelWriter, scratch: Path,
    batch_size: int, device: torch.device, ignore_index: int, tta: TestTimeAugment | None = None,
) -> LabelingResult:
    """Generate, select and store one round of pseudo-labels for ``dataset`` (in its order).

    ``tta`` averages multi-scale and flipped views before the policy sees them.
    """
    tta = tta or TestTimeAugment()
    policy.reset()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    ids: list[list[str]] = []
    sizes: list[tuple[int, ...]] = []
    cache = LogitCache(scratch)
    try:
        with cache:
            recorder = CacheRecorder(adapter, cache)
            for batch in progress(loader, desc="pseudo-labels: predict", unit="batch"):
                images = batch["image"].to(device)
                policy.observe(SegPrediction(logits=tta.predict(recorder, images).logits))
                ids.append(batch["id"])
                sizes.append(tuple(images.shape))
        log.info("logit cache: %d bytes for %d images", cache.nbytes, sum(map(len, ids)))

        def replay():
            return (SegPrediction(logits=logits) for logits in replay_logits(adapter, tta, cache, sizes))

        thresholds = policy.fit(portion, replay=replay)
        selected, cm = _select_and_write(policy, replay(), ids, dataset, writer, ignore_index)
    finally:
        cache.remove()
    writer.finish(thresholds=thresholds.numpy(), predicted_pixels=policy.predicted_pixels.numpy(),
                  selected_pixels=selected.numpy(), histogram=None)
    return _result(policy, thresholds, selected, cm)


def _select_and_write(policy, preds: Iterator[SegPrediction], ids, dataset, writer, ignore_index: int):
    """Pass 2: select from cached logits, write each image, count selected pixels (and hits on GT)."""
    num_classes = len(policy.predicted_pixels)
    selected = torch.zeros(num_classes, dtype=torch.int64)
    cm = ConfusionMatrix(num_classes, ignore_index)
    start = 0
    for pred, batch_ids in zip(preds, ids):
        chosen = policy.select_with_confidence(pred)
        selected += bincount_skipping(chosen.labels, chosen.labels == ignore_index, num_classes)
        writer.add_segmentation_batch(batch_ids, chosen.labels.to(torch.uint8).numpy(), chosen.confidence.numpy())
        gt = target_ground_truth(dataset, range(start, start + len(batch_ids)))
        if gt is not None:
            cm.update(chosen.labels, gt)
        start += len(batch_ids)
    return selected, cm


def target_ground_truth(dataset, indices: range) -> torch.Tensor | None:
    """Target ground truth of a batch [B, H, W] when the data set has it (reporting only)."""
    read = getattr(dataset, "ground_truth", None)
    if read is None:
        return None
    maps = [read(i) for i in indices]
    if any(m is None for m in maps):
        return None
    return torch.from_numpy(np.stack(maps).astype(np.int64))


def _result(policy, thresholds: torch.Tensor, selected: torch.Tensor, cm: ConfusionMatrix) -> LabelingResult:
    predicted = policy.predicted_pixels
    precision, overall = cm.precision_report()
    return LabelingResult(
        thresholds=[float(t) for t in thresholds], predicted_pixels=[int(v) for v in predicted],
        selected_pixels=[int(v) for v in selected], precision=precision,
        selected_share=int(selected.sum()) / max(int(predicted.sum()), 1), precision_overall=overall,
    )
