"""What differs between segmentation and detection, behind one small interface the engine calls.

A task knows how to batch its samples, augment them, compute supervised losses, evaluate, make
online pseudo-labels (teacher view -> policy -> student step), and give the labelling pipeline
(:mod:`selftrain.pseudo`) its labeller, predictions and sink. The engine stays the
same round loop for both.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from . import dist
from .data.transforms import Augment, DetAugment, photometric
from .cache import CachedPredictions, LogitCache
from .detection import keep_plausible
from .errors import ConfigError
from .metrics import miou_subset, voc_ap
from .progress import progress
from .pseudo import BoxSink, ForwardPredictions, OnlineBoxLabeller, OnlineSegLabeller, PixelSink, ThresholdLabeller, loader
from .training import collate as seg_collate
from .training import evaluate as seg_evaluate
from .types import StepOutputs


class SegmentationTask:
    """Dense labels: batches of equal-size images, CE losses, mIoU."""

    name = "segmentation"

    def __init__(self, data: Any, *, mine_probability: float = 0.5) -> None:
        self.data = data
        self.mine_probability = mine_probability
        self.collate = seg_collate

    def augment(self, dataset: Dataset, mine_classes: Sequence[int] = ()) -> Dataset:
        d = self.data
        return Augment(dataset, flip=d.flip, crop=d.crop, scale=d.scale, mine_classes=mine_classes,
                       mine_probability=self.mine_probability, ignore_index=d.ignore_index)

    def images(self, batch: dict[str, Any], device: str) -> torch.Tensor:
        return batch["image"].to(device)

    def supervised_step(self, adapter, batch: dict[str, Any], device: str) -> StepOutputs:
        return adapter.forward_train(self.images(batch, device), batch["label"].to(device))

    def evaluate(self, adapter, dataset: Dataset, *, device: str, desc: str) -> dict[str, Any]:
        d = self.data
        result = seg_evaluate(adapter, dataset, num_classes=d.num_classes, ignore_index=d.ignore_index,
                              batch_size=d.eval_batch, device=torch.device(device), desc=desc, tta=d.eval_tta)
        per_class = [float("nan") if v is None else v for v in result["iou"]]
        return {**result, **{k: miou_subset(per_class, idx) for k, idx in d.subset_metrics.items()}}

    def online_step(self, adapter, teacher, policy, batch: dict[str, Any], *, device: str,
                    progress: float) -> StepOutputs:
        """Teacher labels the weak view; the student's CE on the strong view, weighted per image."""
        images = self.images(batch, device)
        targets, weight, _ = policy.segmentation(teacher.predict(images).logits)
        student = photometric(images, normalised=True) if policy.strong_augment else images
        out = adapter.forward_train(student)
        ce = torch.nn.functional.cross_entropy(out.logits, targets, reduction="none").flatten(1).mean(1)
        return StepOutputs(losses={"ce": (weight.to(ce.device) * ce).mean()}, logits=out.logits, features=out.features)

    def labeller(self, policy, *, portion: float, progress: float, device: str) -> Any:
        """ST/CBST/CBST-SP select by thresholds fitted on the round; the mean teacher by its own rule."""
        if policy.offline:
            return ThresholdLabeller(policy, portion=portion, num_classes=self.data.num_classes, device=device)
        return OnlineSegLabeller(policy)

    def predictions(self, model, dataset: Dataset, scratch: Path, *, device: str, offline: bool) -> Any:
        """Offline: ``model`` (the adapter) once, into a logit cache at its output stride, with the
        recipe's test-time augmentation; online: the teacher's full-size logits."""
        batches = loader(dataset, batch_size=self.data.pseudo_batch, collate_fn=self.collate,
                         num_workers=self.data.num_workers, device=device)
        if offline:
            return CachedPredictions(model, batches, LogitCache(scratch), device=device, tta=self.data.pseudo_tta)
        return ForwardPredictions(model.predict, batches, lambda batch: self.images(batch, device))

    def sink(self, dataset: Dataset) -> PixelSink:
        return PixelSink(dataset, num_classes=self.data.num_classes, ignore_index=self.data.ignore_index)


def det_collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Images stay a list (sizes may differ); targets a list of ``{"boxes", "labels"}``."""
    return {
        "image": [s["image"] for s in samples],
        "target": [{"boxes": s["boxes"], "labels": s["labels"]} for s in samples],
        "id": [s["id"] for s in samples],
    }


class DetectionTask:
    """Boxes: list batches, detector losses with a choice of negatives, VOC mAP at IoU 0.5."""

    name = "detection"

    def __init__(self, data: Any, *, use_07: bool = False) -> None:
        self.data = data
        self.use_07 = use_07
        self.collate = det_collate

    def augment(self, dataset: Dataset, mine_classes: Sequence[int] = ()) -> Dataset:
        return DetAugment(dataset, flip=self.data.flip, photometric=self.data.photometric)

    def images(self, batch: dict[str, Any], device: str) -> list[torch.Tensor]:
        return [im.to(device) for im in batch["image"]]

    def supervised_step(self, adapter, batch: dict[str, Any], device: str) -> StepOutputs:
        return adapter.forward_train(self.images(batch, device), batch["target"], negatives="hard", box_loss=True)

    @torch.no_grad()
    def evaluate(self, adapter, dataset: Dataset, *, device: str, desc: str) -> dict[str, Any]:
        detections, truths = [], []
        loader = DataLoader(dist.shard_of(dataset, self.data.eval_batch), batch_size=self.data.eval_batch, shuffle=False,
                            collate_fn=_eval_collate)
        for images, gts in progress(loader, desc=desc, unit="batch"):
            for pred in adapter.predict([im.to(device) for im in images]):
                detections.append({"boxes": pred.boxes.cpu(), "scores": pred.scores.cpu(), "labels": pred.labels.cpu()})
            truths += gts
        shards = dist.all_gather_objects((detections, truths))  # every rank scores the whole set (rank order)
        detections, truths = [d for s in shards for d in s[0]], [t for s in shards for t in s[1]]
        mean_ap, per_class = voc_ap(detections, truths, self.data.num_classes, use_07=self.use_07)
        return {"map": _pct(mean_ap), "ap": [_pct(v) for v in per_class]}

    def online_step(self, adapter, teacher, policy, batch: dict[str, Any], *, device: str,
                    progress: float) -> StepOutputs:
        """Teacher (the student for WST) labels the batch; the student learns from those boxes, less any
        that no detector can train on (``selftrain.detection.plausible_boxes``: zero-area, inverted or
        non-finite, as a diverged teacher makes them)."""
        images = self.images(batch, device)
        made = [keep_plausible({"boxes": m["boxes"], "labels": m["labels"]})
                for m in policy.detections(teacher.predict(images), progress)]
        student = [photometric(im, normalised=False) for im in images] if policy.strong_augment else images
        targets = [{"boxes": m["boxes"].detach(), "labels": m["labels"].detach()} for m in made]
        return adapter.forward_train(student, targets, negatives=policy.negatives, box_loss=policy.box_loss)

    def labeller(self, policy, *, portion: float, progress: float, device: str) -> Any:
        """Boxes are labelled online only (WST, mean teacher): the policy's reliability at ``progress``."""
        if policy.offline:
            raise ConfigError(f"policy {policy.name!r} labels pixels; detection runs take an online policy "
                              "(wst, mean_teacher)")
        return OnlineBoxLabeller(policy, progress=progress)

    def predictions(self, model, dataset: Dataset, scratch: Path, *, device: str, offline: bool) -> Any:
        batches = loader(dataset, batch_size=self.data.pseudo_batch, collate_fn=self.collate,
                         num_workers=self.data.num_workers, device=device)
        return ForwardPredictions(model.predict, batches, lambda batch: self.images(batch, device))

    def sink(self, dataset: Dataset) -> BoxSink:
        return BoxSink(dataset, num_classes=self.data.num_classes)


def _eval_collate(samples: list[dict[str, Any]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    images = [s["image"] for s in samples]
    truths = [{"boxes": s["boxes"], "labels": s["labels"], "difficult": s.get("difficult")} for s in samples]
    for t in truths:
        if t["difficult"] is None:
            del t["difficult"]
    return images, truths


def _pct(value: float) -> float | None:
    return None if value is None or math.isnan(value) else 100.0 * float(value)


def build_task(name: str, data: Any, *, mine_probability: float = 0.5,
               use_07: bool = False) -> SegmentationTask | DetectionTask:
    if name == "detection":
        return DetectionTask(data, use_07=use_07)
    return SegmentationTask(data, mine_probability=mine_probability)
