"""One labelling pipeline for every policy and task: predict -> (observe -> fit) -> select -> write.

:func:`write_round` drives a *labeller* over a task's *predictions* and hands what it selects to
a *sink*, which counts it, scores it against target ground truth (reporting only) and writes it:

- :class:`ThresholdLabeller` (ST, CBST, CBST-SP; offline rounds): pass 1 observes every batch,
  ``fit`` sets the exact thresholds (replaying the logit cache of :mod:`selftrain.cache`), pass 2
  selects from the cache;
- :class:`OnlineSegLabeller` (mean teacher) and :class:`OnlineBoxLabeller` (WST, mean teacher on
  boxes): one pass, the policy's own selection, at the end of an online round.

:class:`PixelSink` and :class:`BoxSink` keep their counts on the model's device and copy back only
uint8 labels and float16 confidences (segmentation) or the kept boxes (detection).

Several processes (torchrun): :func:`label_round` gives each process an exact contiguous shard of
whole batches of the target set (no padding, so no image is counted twice, and every batch is the
batch one process would make, so predictions are bit for bit those of one process). Histograms,
refinement counts and sink statistics are summed over processes, so thresholds and counts equal
one process's; each process writes ``round_RRR.shard-r-of-w.h5`` and rank 0 publishes the round
file only after every shard is complete (:func:`selftrain.store.merge_shards`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import dist
from .cache import CachedPredictions, CacheRecorder, CacheReplay, LogitCache, replay_logits
from .detection import keep_plausible, selection_summary
from .errors import DataError
from .metrics import BoxPrecision, ConfusionMatrix, bincount_skipping
from .policies.functional import empty_histogram
from .progress import progress
from .store import PseudoLabelWriter, RoundMeta, merge_shards
from .training import collate
from .tta import TestTimeAugment
from .types import RoundLabels, SegPrediction, SegPseudoLabels

__all__ = ["BoxSink", "CacheRecorder", "CacheReplay", "CachedPredictions", "ForwardPredictions", "LogitCache",
           "OnlineBoxLabeller", "OnlineSegLabeller", "PixelSink", "ThresholdLabeller", "label_round", "label_target",
           "loader", "replay_logits", "target_ground_truth", "write_round"]

log = logging.getLogger(__name__)


class Predictions(Protocol):
    """A task's predictions over a target set: ``(ids, prediction)`` per batch."""

    def __len__(self) -> int: ...
    def first(self) -> Iterator[tuple[list[str], Any]]: ...
    def again(self) -> Iterator[tuple[list[str], Any]]: ...


class Labeller(Protocol):
    """Turns predictions into pseudo-labels. ``fits``: observe a first pass and fit before selecting."""

    fits: bool

    def observe(self, pred: Any) -> None: ...
    def fit(self, replay: Callable[[], Iterable[Any]]) -> None: ...
    def select(self, pred: Any) -> Any: ...
    def labels(self, sink: Any) -> RoundLabels: ...


class ForwardPredictions:
    """``predict(images)`` over ``batches``, once per pass (online rounds select in one pass)."""

    def __init__(self, predict: Callable[[Any], Any], batches: Iterable[dict[str, Any]],
                 images: Callable[[dict[str, Any]], Any]) -> None:
        self.predict, self.batches, self.images = predict, batches, images

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def first(self) -> Iterator[tuple[list[str], Any]]:
        for batch in self.batches:
            yield list(batch["id"]), self.predict(self.images(batch))

    again = first


# -- labellers ---------------------------------------------------------------------------------


class ThresholdLabeller:
    """ST / CBST / CBST-SP (Zou et al., ECCV 2018): exact thresholds for ``portion`` from every
    process's pixels, then selection with the assigned class's softmax probability."""

    fits = True

    def __init__(self, policy: Any, *, portion: float, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.policy, self.portion, self.num_classes, self.device = policy, portion, num_classes, device
        policy.reset()

    def observe(self, pred: SegPrediction) -> None:
        self.policy.observe(pred)

    def fit(self, replay: Callable[[], Iterable[SegPrediction]]) -> None:
        if self.policy.hist is None:  # this process's shard is empty; it still joins every sum
            self.policy.hist = empty_histogram(self.num_classes, self.device)
        self.policy.fit(self.portion, replay=replay, reduce=dist.all_reduce_sum)

    def select(self, pred: SegPrediction) -> SegPseudoLabels:
        return self.policy.select_with_confidence(pred)

    def labels(self, sink: PixelSink) -> RoundLabels:
        predicted = [int(v) for v in self.policy.predicted_pixels.tolist()]
        return sink.labels(thresholds=[float(t) for t in self.policy.thresholds.tolist()], predicted=predicted,
                           selected_share=sum(sink.selected) / max(sum(predicted), 1))

    def statistics(self, sink: PixelSink) -> dict[str, Any]:
        """What the round file stores beside the labels."""
        return {"thresholds": self.policy.thresholds.cpu().numpy(),
                "predicted_pixels": self.policy.predicted_pixels.cpu().numpy(), "selected_pixels": sink.counts}


class OnlineSegLabeller:
    """The mean teacher's own pixel selection (its confidence threshold), one pass."""

    fits = False

    def __init__(self, policy: Any) -> None:
        self.policy = policy

    def select(self, pred: SegPrediction) -> SegPseudoLabels:
        return self.policy.segmentation(pred.logits)[2]

    def labels(self, sink: PixelSink) -> RoundLabels:
        return sink.labels(threshold=float(self.policy.threshold))

    def statistics(self, sink: PixelSink) -> dict[str, Any]:
        return {"selected_pixels": sink.counts}


class OnlineBoxLabeller:
    """WST / mean teacher on boxes: each image's detections kept by the policy's reliability
    (SRRS or score) at ``epsilon``, less implausible boxes; the criterion values of every final
    detection are gathered over processes for the round's ``selection`` summary."""

    fits = False

    def __init__(self, policy: Any, *, progress: float) -> None:
        self.policy = policy
        self.epsilon = policy.epsilon(min(progress, 1.0))
        self.values: list[torch.Tensor] = []
        self.per_class = False

    def select(self, preds: list[Any]) -> list[dict[str, torch.Tensor]]:
        kept = []
        for pred in preds:
            reliability = self.policy.reliability(pred)
            self.values.append(reliability.detach().cpu())
            self.per_class = self.per_class or pred.class_candidates is not None
            kept.append({k: v.cpu() for k, v in keep_plausible(self.policy.keep(pred, reliability, self.epsilon)).items()})
        return kept

    def labels(self, sink: BoxSink) -> RoundLabels:
        gathered = dist.all_gather_objects((self.values, self.per_class))
        values = [v for rank_values, _ in gathered for v in rank_values]
        per_class = any(flag for _, flag in gathered)
        criterion = self.policy.criterion
        candidates = ("per_class" if per_class else "any_class") if criterion == "srrs" else None
        selection = {"criterion": criterion, "candidates": candidates,
                     **selection_summary(torch.cat(values) if values else torch.zeros(0), self.epsilon)}
        return sink.labels(threshold=float(self.policy.threshold), selection=selection)

    def statistics(self, sink: BoxSink) -> dict[str, Any]:
        return {}


# -- sinks -------------------------------------------------------------------------------------


class PixelSink:
    """Writes each batch's labels (uint8) and confidences (float16), counts selected pixels per class
    and, where the data set has ground truth, the confusion matrix of the selected pixels."""

    def __init__(self, dataset: Dataset, *, num_classes: int, ignore_index: int) -> None:
        self.dataset, self.num_classes, self.ignore_index = dataset, num_classes, ignore_index
        self._selected: torch.Tensor | None = None
        self.cm = ConfusionMatrix(num_classes, ignore_index)
        self.start = 0
        self.scored = True

    def add(self, writer: PseudoLabelWriter, ids: list[str], made: SegPseudoLabels) -> None:
        labels = made.labels
        counts = bincount_skipping(labels, labels == self.ignore_index, self.num_classes)
        self._selected = counts if self._selected is None else self._selected + counts
        host = labels.to(torch.uint8).cpu()
        writer.add_segmentation_batch(ids, host.numpy(), made.confidence.to(torch.float16).cpu().numpy())
        gt = target_ground_truth(self.dataset, range(self.start, self.start + len(ids))) if self.scored else None
        self.scored = gt is not None
        if gt is not None:
            self.cm.update(host.long(), gt)
        self.start += len(ids)

    def reduce(self) -> None:
        """Sum the counts over processes (ground truth counts only if every shard had it)."""
        mine = np.zeros(self.num_classes, np.int64) if self._selected is None else self._selected.cpu().numpy()
        parts = dist.all_gather_objects((mine, self.cm.matrix.numpy(), self.scored or self.start == 0))
        self.counts = np.sum([p[0] for p in parts], axis=0).astype(np.int64)
        self.cm.matrix = torch.from_numpy(np.sum([p[1] for p in parts], axis=0).astype(np.int64))
        self.scored = all(p[2] for p in parts)

    @property
    def selected(self) -> list[int]:
        return [int(v) for v in self.counts]

    def labels(self, **fields: Any) -> RoundLabels:
        precision, overall = self.cm.precision_report() if self.scored else (None, None)
        return RoundLabels(unit="pixels", selected=self.selected, precision=precision, precision_overall=overall,
                           **fields)


class BoxSink:
    """Writes each image's kept boxes, counts them per class and, where the data set has ground
    truth (reporting only; an image without it ends the scoring), their precision at IoU 0.5."""

    def __init__(self, dataset: Dataset, *, num_classes: int) -> None:
        self.dataset, self.num_classes = dataset, num_classes
        self.counts = np.zeros(num_classes, np.int64)
        self.scored = BoxPrecision(num_classes)
        self.truth = getattr(dataset, "ground_truth", None)
        self.index = 0

    def add(self, writer: PseudoLabelWriter, ids: list[str], made: list[dict[str, torch.Tensor]]) -> None:
        for image_id, m in zip(ids, made):
            self.counts += np.bincount(m["labels"].numpy() - 1, minlength=self.num_classes)
            writer.add_detection(image_id, m["boxes"].numpy(), m["labels"].numpy(), m["scores"].numpy(),
                                 m["srrs"].numpy())
            if self.truth is not None:
                try:
                    self.scored.update(m, self.truth(self.index))
                except (DataError, FileNotFoundError):
                    self.truth = None
            self.index += 1

    def reduce(self) -> None:
        has_truth = self.truth is not None
        parts = dist.all_gather_objects((self.counts, self.scored.correct, self.scored.counted, has_truth))
        self.counts = np.sum([p[0] for p in parts], axis=0).astype(np.int64)
        self.scored.correct = np.sum([p[1] for p in parts], axis=0).astype(np.int64)
        self.scored.counted = np.sum([p[2] for p in parts], axis=0).astype(np.int64)
        self.has_truth = all(p[3] for p in parts)

    def labels(self, **fields: Any) -> RoundLabels:
        if not self.has_truth:
            return RoundLabels(unit="boxes", selected=self.counts.tolist(), **fields)
        return RoundLabels(unit="boxes", selected=self.counts.tolist(), precision=self.scored.precision(),
                           precision_overall=self.scored.overall(), **fields)


# -- the pipeline ------------------------------------------------------------------------------


@torch.no_grad()
def write_round(labeller: Any, predictions: Predictions, sink: Any, writer: PseudoLabelWriter) -> RoundLabels:
    """Label one (shard of a) target set into ``writer``; the round's record, summed over processes."""
    if labeller.fits:
        for _, pred in progress(predictions.first(), desc="pseudo-labels: predict", unit="batch",
                                total=len(predictions)):
            labeller.observe(pred)
        labeller.fit(lambda: (pred for _, pred in predictions.again()))
        stream = predictions.again()
    else:
        stream = predictions.first()
    for ids, pred in progress(stream, desc="pseudo-labels: select", unit="batch", total=len(predictions)):
        sink.add(writer, ids, labeller.select(pred))
    sink.reduce()
    record = labeller.labels(sink)
    writer.finish(**labeller.statistics(sink))
    return record


def label_round(labeller: Any, predictions: Callable[[Dataset, Path], Predictions],
                sink: Callable[[Dataset], Any], *, dataset: Dataset, batch_size: int, meta: RoundMeta,
                path: Path) -> RoundLabels:
    """Label ``dataset`` into the round file ``path``, in one process or several.

    ``predictions(part, scratch)`` and ``sink(part)`` are made for this process's part of the
    target set; ``scratch`` is where a logit cache may go (removed afterwards).
    """
    part = _batch_shard(dataset, batch_size)
    w, r = dist.world_size(), dist.rank()
    out = path if w == 1 else shard_path(path, r, w)
    scratch = out.with_suffix(".logits.tmp")
    try:
        with PseudoLabelWriter(out, meta) as writer:
            record = write_round(labeller, predictions(part, scratch), sink(part), writer)
    finally:
        scratch.unlink(missing_ok=True)
    if w > 1:
        _publish(path, w)
    return record


def shard_path(path: Path, r: int, w: int) -> Path:
    return path.with_name(f"{path.stem}.shard-{r}-of-{w}.h5")


def _publish(path: Path, w: int) -> None:
    """Rank 0 merges the shards into ``path`` once every process has finished its own."""
    dist.barrier()
    if dist.is_main():
        shards = [shard_path(path, r, w) for r in range(w)]
        merge_shards(shards, path)
        for s in shards:
            s.unlink(missing_ok=True)
    dist.barrier()


class _Part(Dataset):
    """Images ``indices`` of a data set, ground truth included (reporting reads it by position)."""

    def __init__(self, dataset: Dataset, indices: range) -> None:
        self.dataset, self.indices = dataset, indices
        if getattr(dataset, "ground_truth", None) is not None:
            self.ground_truth = lambda i: dataset.ground_truth(self.indices[i])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[self.indices[i]]


def _batch_shard(dataset: Dataset, batch_size: int) -> Dataset:
    """This process's contiguous shard of whole batches (the data set itself in one process)."""
    part = dist.shard_of(dataset, batch_size)
    return dataset if part is dataset else _Part(dataset, part.indices)


def loader(dataset: Dataset, *, batch_size: int, collate_fn: Callable, num_workers: int = 0,
           device: torch.device | str = "cpu") -> DataLoader:
    """The target set in order, decoded by ``num_workers`` processes, pinned for a CUDA device."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn, num_workers=num_workers,
                      pin_memory=str(device).startswith("cuda"))


def target_ground_truth(dataset, indices: range) -> torch.Tensor | None:
    """Target ground truth of a batch [B, H, W] when the data set has it (reporting only)."""
    read = getattr(dataset, "ground_truth", None)
    if read is None:
        return None
    maps = [read(i) for i in indices]
    if any(m is None for m in maps):
        return None
    return torch.from_numpy(np.stack(maps).astype(np.int64))


def label_target(*, adapter, policy, dataset: Dataset, portion: float, writer: PseudoLabelWriter, scratch: Path,
                 batch_size: int, device: torch.device | str, ignore_index: int,
                 tta: TestTimeAugment | None = None, num_workers: int = 0) -> RoundLabels:
    """One offline round of ``policy`` over all of ``dataset`` in this process, into ``writer``
    (which it finishes): the pipeline without shards, for scripts and benchmarks."""
    num_classes = writer.num_classes
    batches = loader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=num_workers, device=device)
    cache = LogitCache(scratch)
    try:
        predictions = CachedPredictions(adapter, batches, cache, device=device, tta=tta)
        return write_round(ThresholdLabeller(policy, portion=portion, num_classes=num_classes, device=device), predictions,
                           PixelSink(dataset, num_classes=num_classes, ignore_index=ignore_index), writer)
    finally:
        cache.remove()
