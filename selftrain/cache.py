"""The logit cache of offline labelling: one network pass, every later pass read from scratch disk.

Pass 1 runs the model once over the target images and writes the logits as float16 to a scratch
file; the threshold fit (one or two more reads) and the selection pass read it back batch by
batch, so host memory holds one batch at a time whatever the size of the target set.

The scratch file holds the logits at the network's output stride, not at the input size
(19 x 128 x 256 x 2 B = 1.25 MB instead of 19 x 1024 x 2048 x 2 B = 79.7 MB for a Cityscapes image
through DeepLab-v2 at stride 8, 3.7 GB instead of 237 GB for the 2,975 train images;
``benchmarks/logit_cache.py`` measures it). Every read moves a batch back to the model's device
and upsamples it there with the adapter's ``upsample_logits`` (what ``predict`` does), so each
pass sees the same full-size logits bit for bit. With test-time augmentation each view is cached
at its own output stride (scale s costs s^2 of the plain view) and the views are combined again on
every read: the combination (a log-softmax at the input size) cannot be taken before upsampling
without changing the numbers.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DataError
from .tta import TestTimeAugment
from .types import SegPrediction

log = logging.getLogger(__name__)

_FLOAT16_MAX = 65504.0


class LogitCache:
    """Append-only float16 scratch file of logit batches, read back in the same order.

    The file opens on the first write and closes (flushed) on the first read.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.shapes: list[tuple[int, ...]] = []
        self._fh: Any = None
        self._warned = False

    def __enter__(self) -> LogitCache:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def write(self, logits: torch.Tensor) -> torch.Tensor:
        """Store a batch; returns the float16-rounded logits (on their device, as float32) so every
        pass sees identical values.

        Logits beyond float16's range (|z| > 65504, where the softmax is one-hot anyway) are clipped
        to it rather than stored as infinities, whose costs would be NaN; a warning says so once.
        NaN logits (a diverged model) are a DataError. Both come from one reduction per batch at the
        network's output stride.
        """
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "wb")
        logits = logits.detach()
        top = float(logits.abs().max()) if logits.numel() else 0.0  # NaN when any logit is NaN
        if math.isnan(top):
            raise DataError("the model's logits on the target images are not finite (NaN): the checkpoint that "
                            "labels this round has diverged; resume from an earlier round's checkpoint or lower "
                            "the learning rate")
        if top > _FLOAT16_MAX and not self._warned:
            self._warned = True
            log.warning("logits up to %.3g exceed float16's range: the labelling cache clips them to +-65504 (a model "
                        "with such logits has probably diverged)", top)
        half = logits.clamp(-_FLOAT16_MAX, _FLOAT16_MAX).to(torch.float16)
        self._fh.write(half.cpu().contiguous().numpy().tobytes())
        self.shapes.append(tuple(half.shape))
        return half.float()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def read(self, device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
        """The cached batches in write order, float32 on ``device``."""
        self.close()
        if not self.shapes:
            return
        with open(self.path, "rb") as fh:
            for shape in self.shapes:
                n = int(np.prod(shape))
                data = np.frombuffer(fh.read(n * 2), dtype=np.float16).reshape(shape)
                yield torch.from_numpy(data.copy()).to(device).float()

    @property
    def nbytes(self) -> int:
        """Bytes written so far."""
        return sum(2 * int(np.prod(shape)) for shape in self.shapes)

    def remove(self) -> None:
        self.close()
        if self.path.exists():
            os.remove(self.path)


class CacheRecorder:
    """The adapter as test-time augmentation sees it in pass 1: each view runs the network at its
    output stride, the float16 logits go to the cache, and the view gets them upsampled exactly as
    :class:`CacheReplay` will upsample them when the cache is read back."""

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


def replay_logits(adapter: Any, tta: TestTimeAugment, cache: LogitCache, sizes: list[tuple[int, ...]],
                  device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
    """Full-size logits [B, C, H, W] of each cached batch on ``device``, computed as in pass 1.

    ``sizes`` holds each batch's image shape [B, 3, H, W]; test-time augmentation reads nothing of
    the images but their size outside ``predict``, so a zero-stride placeholder stands in for them.
    """
    views = cache.read(device)
    replay = CacheReplay(adapter, views)
    try:
        for shape in sizes:
            yield tta.predict(replay, torch.zeros((), device=device).expand(*shape)).logits
    finally:
        views.close()


class CachedPredictions:
    """Segmentation predictions of a target set for offline labelling: :meth:`first` runs the model
    over ``batches`` and fills the cache, :meth:`again` replays the cache (no network, no images).

    Both yield ``(ids, SegPrediction)`` per batch, the logits at the input size on ``device``.
    """

    def __init__(self, adapter: Any, batches: Iterable[dict[str, Any]], cache: LogitCache, *,
                 device: torch.device | str, tta: TestTimeAugment | None = None) -> None:
        self.adapter, self.batches, self.cache = adapter, batches, cache
        self.device, self.tta = device, tta or TestTimeAugment()
        self.ids: list[list[str]] = []
        self.sizes: list[tuple[int, ...]] = []

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def first(self) -> Iterator[tuple[list[str], SegPrediction]]:
        recorder = CacheRecorder(self.adapter, self.cache)
        for batch in self.batches:
            images = batch["image"].to(self.device, non_blocking=True)
            pred = SegPrediction(logits=self.tta.predict(recorder, images).logits)
            self.ids.append(list(batch["id"]))
            self.sizes.append(tuple(images.shape))
            yield self.ids[-1], pred
        log.info("logit cache: %d bytes for %d images", self.cache.nbytes, sum(map(len, self.ids)))

    def again(self) -> Iterator[tuple[list[str], SegPrediction]]:
        logits = replay_logits(self.adapter, self.tta, self.cache, self.sizes, self.device)
        for ids, batch_logits in zip(self.ids, logits):
            yield ids, SegPrediction(logits=batch_logits)
