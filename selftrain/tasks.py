"""What differs between segmentation and detection, behind one small interface the engine calls.

A task knows how to batch its samples, augment them, compute supervised losses, evaluate, and
make and store online pseudo-labels (teacher view -> policy -> student step). The engine stays the
same round loop for both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from .data.transforms import Augment, DetAugment, photometric
from .detection import keep_plausible, selection_summary
from .errors import DataError
from .metrics import BoxPrecision, ConfusionMatrix, bincount_skipping, miou_subset, voc_ap
from .progress import progress
from .pseudo import target_ground_truth
from .store import PseudoLabelWriter
from .training import collate as seg_collate
from .training import evaluate as seg_evaluate
from .types import StepOutputs


@dataclass(frozen=True)
class StoredLabels:
    """What an online round stored: labels (pixels or boxes) per class and, when the target set
    has ground truth (reporting only, never trained on), their precision per class and overall.

    ``selection`` (detection): what the policy's threshold saw over the final detections of every
    target image, so that a round that kept nothing says why: ``criterion`` ("srrs" or "score"),
    ``candidates`` (the SRRS reading, "per_class" / "any_class", None for the score) and
    :func:`selftrain.detection.selection_summary` (epsilon, detections, how many reach it, share,
    quantiles).
    """

    counts: list[int]
    precision: list[float | None] | None = None
    precision_overall: float | None = None
    selection: dict[str, Any] | None = None

    def record(self, threshold: float) -> dict[str, Any]:
        """The ``pseudo`` part of the round's record in metrics.jsonl (read by the plots and ``labels``):
        counts and precision per class, the policy's one ``threshold`` per class, and ``selection``."""
        extra = {} if self.selection is None else {"selection": self.selection}
        return {"selected_pixels": self.counts, "thresholds": [threshold] * len(self.counts),
                "precision": self.precision, "precision_overall": self.precision_overall, "selected_share": None,
                **extra}


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

    def write_online(self, teacher, policy, dataset: Dataset, writer: PseudoLabelWriter, *, device: str,
                     progress_value: float) -> StoredLabels:
        """Store what the teacher and policy make for every target image at the end of the round."""
        loader = DataLoader(dataset, batch_size=self.data.pseudo_batch, shuffle=False, collate_fn=self.collate)
        counts = torch.zeros(self.data.num_classes, dtype=torch.int64)
        cm = ConfusionMatrix(self.data.num_classes, self.data.ignore_index)
        start = 0
        for batch in progress(loader, desc="pseudo-labels: store", unit="batch"):
            _, _, made = policy.segmentation(teacher.predict(self.images(batch, device)).logits)
            labels = made.labels.cpu()
            counts += bincount_skipping(labels, labels == self.data.ignore_index, self.data.num_classes)
            writer.add_segmentation_batch(batch["id"], labels.to(torch.uint8).numpy(), made.confidence.cpu().numpy())
            gt = target_ground_truth(dataset, range(start, start + len(labels)))
            if gt is not None:
                cm.update(labels, gt)
            start += len(labels)
        writer.finish(selected_pixels=counts.numpy())
        return StoredLabels(counts.tolist(), *cm.precision_report())


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
        loader = DataLoader(dataset, batch_size=self.data.eval_batch, shuffle=False, collate_fn=_eval_collate)
        for images, gts in progress(loader, desc=desc, unit="batch"):
            for pred in adapter.predict([im.to(device) for im in images]):
                detections.append({"boxes": pred.boxes.cpu(), "scores": pred.scores.cpu(), "labels": pred.labels.cpu()})
            truths += gts
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

    @torch.no_grad()
    def write_online(self, teacher, policy, dataset: Dataset, writer: PseudoLabelWriter, *, device: str,
                     progress_value: float) -> StoredLabels:
        """Store the pseudo-boxes of every target image at the end of the round, and report what the
        threshold saw (``StoredLabels.selection``)."""
        loader = DataLoader(dataset, batch_size=self.data.pseudo_batch, shuffle=False, collate_fn=self.collate)
        counts = torch.zeros(self.data.num_classes, dtype=torch.int64)
        scored = BoxPrecision(self.data.num_classes)
        truth = getattr(dataset, "ground_truth", None)
        epsilon, values, per_class = policy.epsilon(progress_value), [], False
        index = 0
        for batch in progress(loader, desc="pseudo-labels: store", unit="batch"):
            for image_id, pred in zip(batch["id"], teacher.predict(self.images(batch, device))):
                reliability = policy.reliability(pred)
                values.append(reliability.detach().cpu())
                per_class = per_class or pred.class_candidates is not None
                m = {k: v.cpu() for k, v in keep_plausible(policy.keep(pred, reliability, epsilon)).items()}
                counts += torch.bincount(m["labels"] - 1, minlength=self.data.num_classes)
                writer.add_detection(image_id, m["boxes"].numpy(), m["labels"].numpy(), m["scores"].numpy(),
                                     m["srrs"].numpy())
                if truth is not None:  # reporting only; an image without ground truth ends the scoring
                    try:
                        scored.update(m, truth(index))
                    except (DataError, FileNotFoundError):
                        truth = None
                index += 1
        writer.finish()
        selection = _selection(policy.criterion, values, epsilon, per_class)
        if truth is None:
            return StoredLabels(counts.tolist(), selection=selection)
        return StoredLabels(counts.tolist(), scored.precision(), scored.overall(), selection=selection)


def _selection(criterion: str, values: list[torch.Tensor], epsilon: float, per_class: bool) -> dict[str, Any]:
    """``StoredLabels.selection`` from the criterion values of every image's final detections ([M_i] each)."""
    candidates = ("per_class" if per_class else "any_class") if criterion == "srrs" else None
    return {"criterion": criterion, "candidates": candidates,
            **selection_summary(torch.cat(values) if values else torch.zeros(0), epsilon)}


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
