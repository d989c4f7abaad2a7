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

    def precision_report(self) -> tuple[list[float | None] | None, float | None]:
        """Pseudo-label precision as metrics.jsonl records it: per class (None where nothing was
        predicted) and overall; (None, None) when no labelled pixel was counted."""
        if int(self.matrix.sum()) == 0:
            return None, None
        return [None if np.isnan(v) else float(v) for v in self.precision()], self.accuracy()


def miou_subset(per_class_iou, indices) -> float:
    """Mean IoU over ``indices`` of ``per_class_iou`` [C], skipping NaN (absent classes); NaN when
    none is present. ``miou_subset(iou16, SYNTHIA_13)`` is the mIoU* of SYNTHIA -> Cityscapes."""
    values = np.asarray(per_class_iou, dtype=np.float64)[list(indices)]
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def miou(pred, gt, num_classes: int, ignore_index: int = 255) -> tuple[float, np.ndarray]:
    """Mean IoU over the classes present in ground truth or prediction, and per-class IoU [C]."""
    cm = ConfusionMatrix(num_classes, ignore_index)
    cm.update(torch.as_tensor(np.asarray(pred)), torch.as_tensor(np.asarray(gt)))
    per_class = cm.iou()
    return float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan"), per_class


# PASCAL VOC detection AP (Everingham et al., IJCV 2010; devkit VOCevaldet.m / VOCap.m).
# Boxes are xyxy with continuous coordinates: widths are x2 - x1, where the devkit, made for
# integer pixel indices, uses x2 - x1 + 1. Numbers therefore differ slightly from the devkit's.


def _as_array(value, dtype, shape=(-1,)) -> np.ndarray:
    """A tensor, array or list as a numpy array of ``dtype`` reshaped to ``shape``."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype).reshape(shape)


def _area(boxes: np.ndarray) -> np.ndarray:
    """Areas of xyxy boxes, continuous coordinates. [N, 4] -> [N]."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of xyxy boxes, continuous coordinates; 0 where the union is empty. [N, 4], [M, 4] -> [N, M]."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0.0, None), axis=2)
    union = _area(a)[:, None] + _area(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _check_labels(labels: np.ndarray, num_classes: int, what: str) -> np.ndarray:
    bad = labels[(labels < 1) | (labels > num_classes)]
    if bad.size:
        raise ValueError(f"voc_ap: {what} label {bad[0]} outside 1..{num_classes}")
    return labels


def _image_matches(det_boxes: np.ndarray, gt_boxes: np.ndarray, gt_difficult: np.ndarray, iou: float):
    """Devkit matching inside one image and class: each detection's best-overlap GT.

    Returns ``(gt_index [N], on_difficult [N])``: the argmax-IoU ground truth when its IoU is
    ``>= iou`` (VOCevaldet.m; py-faster-rcnn's voc_eval.py uses ``>``), else -1.
    """
    if len(gt_boxes) == 0 or len(det_boxes) == 0:
        return np.full(len(det_boxes), -1), np.zeros(len(det_boxes), dtype=bool)
    overlaps = _pairwise_iou(det_boxes, gt_boxes)
    best = overlaps.argmax(axis=1)
    hit = overlaps[np.arange(len(det_boxes)), best] >= iou
    return np.where(hit, best, -1), hit & gt_difficult[best]


def _true_false_positives(image: np.ndarray, gt_index: np.ndarray, on_difficult: np.ndarray):
    """TP/FP flags [N] of detections already sorted by score: a non-difficult GT counts once.

    The devkit matches each detection to its best GT even if taken, so the first detection (in
    score order) on an (image, GT) pair is the TP and later ones are FPs; detections on a difficult
    GT are neither.
    """
    counted = (gt_index >= 0) & ~on_difficult
    keys = image[counted] * (gt_index.max(initial=0) + 1) + gt_index[counted]
    tp = np.zeros(len(image), dtype=bool)
    tp[np.flatnonzero(counted)[np.unique(keys, return_index=True)[1]]] = True
    return tp, ~tp & ~on_difficult


def _interpolated_ap(recall: np.ndarray, precision: np.ndarray, use_07: bool) -> float:
    """VOC AP from a precision/recall curve: 11-point (VOC2007) or all-point (VOC2010+, VOCap.m)."""
    if use_07:  # thresholds k / 10 exactly, so recall 0.3 counts at t = 0.3 (np.arange gives 0.30000000000000004)
        return float(np.mean([precision[recall >= t].max(initial=0.0) for t in np.arange(11) / 10]))
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.maximum.accumulate(np.concatenate(([0.0], precision, [0.0]))[::-1])[::-1]
    step = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1]))


def _class_ap(dets: list[dict], gts: list[dict], k: int, iou: float, use_07: bool) -> float:
    """AP of class ``k`` over all images; NaN when it has no non-difficult ground truth."""
    npos = sum(int(np.sum(~g["difficult"][g["labels"] == k])) for g in gts)
    if npos == 0:
        return float("nan")
    parts = []
    for i, (d, g) in enumerate(zip(dets, gts)):
        dm, gm = d["labels"] == k, g["labels"] == k
        matched = _image_matches(d["boxes"][dm], g["boxes"][gm], g["difficult"][gm], iou)
        parts.append((np.full(int(dm.sum()), i), d["scores"][dm], *matched))
    image, scores, gt_index, on_difficult = (np.concatenate(p) for p in zip(*parts))
    order = np.argsort(-scores, kind="stable")  # the devkit's MATLAB sort is stable too
    tp, fp = _true_false_positives(image[order], gt_index[order], on_difficult[order])
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return _interpolated_ap(tp / npos, precision, use_07)


def _voc_image(record: dict, num_classes: int, what: str, gt: bool) -> dict:
    """One image's detections or ground truth as numpy arrays, labels checked."""
    out = {"boxes": _as_array(record["boxes"], np.float64, (-1, 4))}
    out["labels"] = _check_labels(_as_array(record["labels"], np.int64), num_classes, what)
    if gt:
        difficult = record.get("difficult")
        out["difficult"] = np.zeros(len(out["labels"]), bool) if difficult is None else _as_array(difficult, bool)
    else:
        out["scores"] = _as_array(record["scores"], np.float64)
    return out


def voc_ap(
    detections: list[dict], ground_truth: list[dict], num_classes: int, iou: float = 0.5, use_07: bool = False
) -> tuple[float, np.ndarray]:
    """PASCAL VOC mean average precision and per-class AP (Everingham et al., IJCV 2010).

    Devkit rules: per class, detections of all images sorted by score (descending, stable); each
    goes to its highest-IoU ground truth of that class in its image; IoU ``>= iou`` to an unmatched
    GT is a TP, to an already matched GT a FP (duplicate), to a difficult GT neither; below ``iou``
    a FP. Difficult GTs do not count in the number of positives. AP is the all-point interpolated
    area (VOC2010+) or, with ``use_07``, the 11-point mean (VOC2007). IoU uses continuous
    coordinates (no +1, unlike the devkit). A class without non-difficult ground truth gets NaN
    and is left out of the mean; the mean is NaN when every class is.

    Shape:
        detections: list per image of {"boxes": [N, 4], "scores": [N], "labels": [N] in 1..K};
        ground_truth: list per image of {"boxes": [M, 4], "labels": [M], "difficult": [M] optional};
        tensors or arrays  ->  (mAP, per_class [K] with index k-1 for class k).
    """
    if len(detections) != len(ground_truth):
        raise ValueError(f"voc_ap: {len(detections)} images of detections but {len(ground_truth)} of ground truth")
    dets = [_voc_image(d, num_classes, "detection", gt=False) for d in detections]
    gts = [_voc_image(g, num_classes, "ground-truth", gt=True) for g in ground_truth]
    per_class = np.array([_class_ap(dets, gts, k, iou, use_07) for k in range(1, num_classes + 1)])
    finite = np.isfinite(per_class)
    return (float(per_class[finite].mean()) if finite.any() else float("nan")), per_class


def box_hits(boxes: dict, truth: dict, num_classes: int, iou: float = 0.5) -> np.ndarray:
    """Which boxes of one image are correct under VOC rules at IoU ``iou`` (as :func:`voc_ap`).

    Inside each class, boxes in descending score take their best-overlap ground truth; the first on
    a ground truth is correct, a duplicate or a miss is not, a box on a difficult object neither.
    Shape: boxes {"boxes" [N, 4], "scores" [N], "labels" [N]}, truth {"boxes", "labels",
    "difficult"?} -> int8 [N]: 1 correct, 0 wrong, -1 on a difficult object.
    """
    d = _voc_image(boxes, num_classes, "box", gt=False)
    g = _voc_image(truth, num_classes, "ground-truth", gt=True)
    out = np.zeros(len(d["labels"]), np.int8)
    for k in np.unique(d["labels"]):
        idx = np.flatnonzero(d["labels"] == k)
        idx = idx[np.argsort(-d["scores"][idx], kind="stable")]
        gm = g["labels"] == k
        gt_index, on_difficult = _image_matches(d["boxes"][idx], g["boxes"][gm], g["difficult"][gm], iou)
        tp, _ = _true_false_positives(np.zeros(len(idx), np.int64), gt_index, on_difficult)
        out[idx] = np.where(on_difficult, -1, tp.astype(np.int8))
    return out


class BoxPrecision:
    """Precision of pseudo-boxes against ground truth, accumulated image by image (reporting only);
    correct as :func:`box_hits` says, boxes on difficult objects left out."""

    def __init__(self, num_classes: int, iou: float = 0.5) -> None:
        self.num_classes, self.iou = num_classes, iou
        self.correct = np.zeros(num_classes, np.int64)
        self.counted = np.zeros(num_classes, np.int64)

    def update(self, boxes: dict, truth: dict) -> None:
        """One image: ``boxes`` {"boxes", "scores", "labels"}, ``truth`` {"boxes", "labels", "difficult"?}."""
        hits = box_hits(boxes, truth, self.num_classes, self.iou)
        labels = _as_array(boxes["labels"], np.int64) - 1
        self.correct += np.bincount(labels[hits == 1], minlength=self.num_classes)
        self.counted += np.bincount(labels[hits >= 0], minlength=self.num_classes)

    def precision(self) -> list[float | None]:
        """Per class [K]: correct / counted boxes; None for a class without boxes."""
        return [float(c / n) if n else None for c, n in zip(self.correct, self.counted)]

    def overall(self) -> float | None:
        total = int(self.counted.sum())
        return float(self.correct.sum() / total) if total else None


def headline(evaluation: dict) -> tuple[str, float, list]:
    """The score of an evaluation record: ("mIoU", miou, iou) for segmentation, ("mAP", map, ap) for detection."""
    if "miou" in evaluation:
        return "mIoU", float(evaluation["miou"]), list(evaluation.get("iou", []))
    return "mAP", float(evaluation["map"]), list(evaluation.get("ap", []))
