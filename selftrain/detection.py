"""Box maths for detection pseudo-labels: WST and SRRS (Kim et al., ICCV 2019, arXiv:1909.00597).

Weak self-training (Sec. 3.2) fine-tunes a one-stage detector (SSD) on its own target detections
and guards against both error types of those pseudo-labels:

- false positives: a final (post-NMS) detection becomes a pseudo-label only when its Supporting
  Region-based Reliable Score (SRRS, Eq. 3) reaches ``epsilon`` (Algorithm 1);
- false negatives: the background term of the SSD confidence loss uses *weak* negatives (Eq. 2):
  of the negatives that hard negative mining picks, the third with the lowest loss.

Everything here is a pure function on tensors. Boxes are xyxy in pixels with continuous
coordinates (no +1); class 0 is background and detection labels are 1..K.

Supporting regions. Algorithm 1 collects them from O, "the detector's outputs before NMS", and the
paper does not say more. Two readings are implemented (the adapter option ``srrs_candidates``):

- ``per_class`` (the default): O as SSD itself forms it before NMS (Liu et al. 2016; torchvision's
  ``SSD.postprocess_detections``): for each class c, the boxes decoded for c with P(c) above the
  model's score threshold (0.01), at most ``topk_candidates`` (400) of them, highest first; NMS
  reduces these per-class lists to the final detections O*. A detection of class c* is then
  supported by the class-c* candidates with IoU >= delta (:func:`class_candidates`,
  :func:`srrs_per_class`). For Faster R-CNN the lists are the RoI head's (every proposal's
  class-c box with P(c) > its score threshold, 0.05, tiny boxes removed, no top-k).
- ``any_class``: one candidate per default box (RoI) whose best foreground probability is at least
  0.01, the box of that best class; every neighbour counts, also those weak in c*. This was the
  only reading before; it gives bit for bit the same numbers as then.

``per_class`` is the default because it is the output NMS acts on, so O and O* are the two ends of
SSD's own post-processing, as Algorithm 1 has them; ``any_class`` adds regions that SSD never
considers as class-c* outputs and pulls the mean of Eq. 3 down with their small P(c*).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.ops import box_iou as _tv_box_iou

from .types import DetPrediction

NEGATIVE_MODES = ("hard", "weak", "none")
SRRS_CANDIDATES = ("per_class", "any_class")  # readings of "the outputs before NMS" (module docstring)


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes, continuous coordinates (torchvision.ops.box_iou).

    Shape: boxes1 [N, 4], boxes2 [M, 4] -> [N, M], in the promoted floating dtype (at least float32).
    """
    dtype = torch.promote_types(torch.promote_types(boxes1.dtype, boxes2.dtype), torch.float32)
    return _tv_box_iou(boxes1.to(dtype).reshape(-1, 4), boxes2.to(dtype).reshape(-1, 4))


def srrs(
    boxes: torch.Tensor,
    probs: torch.Tensor,
    final_boxes: torch.Tensor,
    final_labels: torch.Tensor,
    delta: float = 0.5,
) -> torch.Tensor:
    """Supporting Region-based Reliable Score of each final detection (Kim et al. 2019, Eq. 3).

    ``SRRS(r*) = 1/N_s * sum_i IoU(r_i, r*) * P(c*|r_i)`` over the supporting regions: the raw
    candidates ``r_i`` with ``IoU(r_i, r*) >= delta`` (Algorithm 1, line 3), ``N_s`` their count
    and ``c*`` the class of ``r*``. The mean is over the supporting regions only. A final box with
    no supporting region scores 0 (the paper leaves ``N_s = 0`` undefined; with ``r*`` itself among
    the candidates, as after SSD's NMS, ``N_s >= 1``).

    Shape:
        boxes: [N, 4] raw (pre-NMS) candidate boxes; probs: [N, K + 1] their softmax (column 0 =
        background); final_boxes: [M, 4]; final_labels: [M] int in 1..K  ->  [M].
    """
    if probs.shape[0] != boxes.shape[0]:
        raise ValueError(f"srrs: {boxes.shape[0]} candidate boxes but {probs.shape[0]} probability rows")
    iou = box_iou(final_boxes, boxes)  # [M, N]
    support = iou >= delta
    class_prob = probs.to(iou.dtype)[:, final_labels.long()].T  # [M, N]: P(c*_l | r_i)
    total = torch.where(support, iou * class_prob, 0.0).sum(dim=1)  # a NaN candidate (NaN IoU) supports nothing
    count = support.sum(dim=1)
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def check_negatives(mode: str) -> str:
    """``mode`` when it names a background setting of Table 4 (:data:`NEGATIVE_MODES`), else a ValueError."""
    if mode not in NEGATIVE_MODES:
        raise ValueError(f"negatives must be one of {', '.join(NEGATIVE_MODES)}, got {mode!r}")
    return mode


def check_srrs_candidates(value: str) -> str:
    """``value`` when it names a reading of the supporting-region candidates, else a ValueError."""
    if value not in SRRS_CANDIDATES:
        raise ValueError(f"srrs_candidates must be one of {', '.join(SRRS_CANDIDATES)}, got {value!r}")
    return value


def class_candidates(
    boxes: torch.Tensor,
    probs: torch.Tensor,
    score_thresh: float,
    topk: int | None = None,
    min_size: float | None = None,
) -> dict[str, torch.Tensor]:
    """A detector's per-class outputs before NMS: the set O of Algorithm 1 (Kim et al. 2019).

    For each class c = 1..K in order, the candidates with ``P(c) > score_thresh``, then (RoI head)
    those with both sides >= ``min_size`` removed otherwise, then (SSD) the ``topk`` highest in
    descending score. This is torchvision's ``SSD.postprocess_detections`` with ``topk =
    topk_candidates`` and shared boxes, and ``RoIHeads.postprocess_detections`` with ``min_size =
    1e-2``, class-specific boxes and no top-k, up to (but without) ``batched_nms``; the RoI head's
    order is proposal by proposal there, class by class here (NMS and SRRS do not depend on it).

    Shape:
        boxes: [A, 4] one box for every class (SSD: the decoded default box) or [A, K + 1, 4] one
        per class (Faster R-CNN: the class-specific regression), clipped; probs: [A, K + 1] softmax
        -> {"boxes": [N, 4], "scores": [N] = P(label), "labels": [N] int64 in 1..K}.
    """
    out_boxes, out_scores, out_labels = [], [], []
    for c in range(1, probs.shape[1]):
        score = probs[:, c]
        keep = score > score_thresh
        score, box = score[keep], (boxes if boxes.dim() == 2 else boxes[:, c])[keep]
        if min_size is not None:
            large = ((box[:, 2] - box[:, 0]) >= min_size) & ((box[:, 3] - box[:, 1]) >= min_size)
            score, box = score[large], box[large]
        if topk is not None:
            score, idx = score.topk(min(topk, score.numel()))
            box = box[idx]
        out_boxes.append(box)
        out_scores.append(score)
        out_labels.append(torch.full_like(score, c, dtype=torch.int64))
    return {"boxes": torch.cat(out_boxes).reshape(-1, 4), "scores": torch.cat(out_scores),
            "labels": torch.cat(out_labels)}


def srrs_per_class(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    final_boxes: torch.Tensor,
    final_labels: torch.Tensor,
    delta: float = 0.5,
) -> torch.Tensor:
    """SRRS (Eq. 3) with supporting regions taken from the per-class pre-NMS lists (``per_class``).

    The supporting regions of a final detection ``r*`` of class ``c*`` are the class-``c*``
    candidates ``r_i`` with ``IoU(r_i, r*) >= delta``; ``P(c*|r_i)`` is their score. As NMS keeps
    one of those candidates as ``r*``, ``N_s >= 1``; a detection without support (not produced by
    these lists) scores 0, as in :func:`srrs`.

    Shape:
        boxes: [N, 4], scores: [N], labels: [N] in 1..K (:func:`class_candidates`); final_boxes:
        [M, 4]; final_labels: [M]  ->  [M].
    """
    if not boxes.shape[0] == scores.shape[0] == labels.shape[0]:
        raise ValueError(f"srrs_per_class: {boxes.shape[0]} boxes, {scores.shape[0]} scores, {labels.shape[0]} labels")
    iou = box_iou(final_boxes, boxes)  # [M, N]
    support = (iou >= delta) & (labels.reshape(1, -1) == final_labels.reshape(-1, 1))
    total = torch.where(support, iou * scores.to(iou.dtype).reshape(1, -1), 0.0).sum(dim=1)
    count = support.sum(dim=1)
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def prediction_srrs(pred: DetPrediction, delta: float = 0.5) -> torch.Tensor:
    """SRRS of every final detection of one image, from the candidates the adapter handed over.

    ``pred.class_candidates`` (the adapter's ``srrs_candidates: per_class``) -> :func:`srrs_per_class`;
    otherwise ``raw_boxes``/``raw_probs`` (``any_class``) -> :func:`srrs`. Shape: -> [M].
    """
    if pred.class_candidates is not None:
        c = pred.class_candidates
        return srrs_per_class(c["boxes"], c["scores"], c["labels"], pred.boxes, pred.labels, delta)
    if pred.raw_boxes is None or pred.raw_probs is None:
        raise ValueError("SRRS needs the adapter's pre-NMS candidates (DetPrediction.class_candidates or "
                         "raw_boxes/raw_probs)")
    return srrs(pred.raw_boxes, pred.raw_probs, pred.boxes, pred.labels, delta)


QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99, "max": 1.0}


def selection_summary(values: torch.Tensor, epsilon: float) -> dict[str, Any]:
    """What a threshold saw: how many final detections, how many reach ``epsilon``, the quantiles.

    Quantiles interpolate linearly between order statistics (``numpy.quantile``'s default); None
    without detections. Shape: values [M] (SRRS or scores of every final detection) -> a JSON-ready
    dict {"epsilon", "detections", "at_least_epsilon", "share", "quantiles": {"p50", "p90", "p99", "max"}}.
    """
    values = values.detach().reshape(-1).double().cpu()
    n = int(values.numel())
    kept = int((values >= epsilon).sum())
    quantiles = None
    if n:
        q = torch.quantile(values, torch.tensor(list(QUANTILES.values()), dtype=torch.float64))
        quantiles = {k: float(v) for k, v in zip(QUANTILES, q)}
    return {"epsilon": float(epsilon), "detections": n, "at_least_epsilon": kept,
            "share": kept / n if n else None, "quantiles": quantiles}


def keep_by_srrs(scores: torch.Tensor, epsilon: float = 0.8) -> torch.Tensor:
    """Which final detections become pseudo-labels: ``SRRS >= epsilon`` (Algorithm 1, line 8).

    The paper uses ``epsilon = 0.8`` (Sec. 4.2) or :func:`epsilon_schedule` with BSR.
    Shape: scores [M] -> bool [M].
    """
    return scores >= epsilon


def epsilon_schedule(progress: float, rate: float = 3.0) -> float:
    """SRRS threshold for WST together with BSR: ``1 / (1 + exp(-3 p))`` (Kim et al. 2019, Sec. 4.2).

    ``p = current iteration / max iteration`` in [0, 1], so ``epsilon`` rises from 0.5 to
    ``1 / (1 + e^-3) ~ 0.953``: more reliable pseudo-labels are demanded as training proceeds.
    """
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1] (current / max iteration), got {progress}")
    return 1.0 / (1.0 + math.exp(-rate * progress))


def select_confident(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pseudo-boxes of naive self-training: the final detections with ``score >= threshold``.

    The "ST" baseline of Kim et al. 2019 (Sec. 4.3, Table 4 row A uses ``threshold = 0.9``); pass
    SRRS values as ``scores`` to select as Algorithm 1 does. Order is kept.
    Shape: boxes [M, 4], scores [M], labels [M] -> the same with M' <= M rows.
    """
    keep = scores >= threshold
    return boxes[keep], scores[keep], labels[keep]


MIN_BOX_SIZE = 1.0  # pixels: the smallest side a pseudo-box may have


def plausible_boxes(boxes: torch.Tensor, min_size: float = MIN_BOX_SIZE) -> torch.Tensor:
    """Which boxes can be training targets: finite coordinates and both sides at least ``min_size``.

    A diverged detector predicts boxes of zero area, inverted corners or NaN coordinates;
    torchvision's detectors raise on a side <= 0 and turn NaN into a NaN loss, so such pseudo-boxes
    are dropped before they reach them. Shape: boxes [N, 4] xyxy -> bool [N].
    """
    boxes = boxes.reshape(-1, 4)
    sides = boxes[:, 2:] - boxes[:, :2]
    return torch.isfinite(boxes).all(dim=1) & (sides >= min_size).all(dim=1)


def keep_plausible(made: dict[str, torch.Tensor], min_size: float = MIN_BOX_SIZE) -> dict[str, torch.Tensor]:
    """One image's pseudo-boxes (``boxes`` [K, 4] and other per-box tensors [K, ...]) without those
    that :func:`plausible_boxes` rejects."""
    keep = plausible_boxes(made["boxes"], min_size)
    return {k: v[keep] for k, v in made.items()}


def _descending_rank(conf_loss: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """0-based rank of every anchor by descending loss over the last dim, negatives first.

    Positives are ranked after every negative; ties keep anchor order (stable sort).
    Shape: [..., A] -> [..., A] int64.
    """
    loss = conf_loss.detach().masked_fill(positive, float("-inf"))
    order = loss.argsort(dim=-1, descending=True, stable=True)
    return order.argsort(dim=-1)


def _hard_count(positive: torch.Tensor, neg_pos_ratio: int) -> torch.Tensor:
    """``|Neg| = min(ratio * num_pos, num_neg)`` per row. Shape: [..., A] -> [..., 1] int64."""
    num_pos = positive.sum(dim=-1, keepdim=True)
    return torch.minimum(neg_pos_ratio * num_pos, positive.shape[-1] - num_pos)


def hard_negative_mask(conf_loss: torch.Tensor, positive: torch.Tensor, neg_pos_ratio: int = 3) -> torch.Tensor:
    """SSD hard negative mining (Liu et al. 2016; torchvision ``SSD.compute_loss``): the set Neg.

    Per row, the ``neg_pos_ratio * num_pos`` negatives with the highest confidence loss. As in
    torchvision, a row without positives gets no negatives (its minimum of ``neg_pos_ratio`` is
    commented out there). Unlike torchvision, the count is capped at the number of negatives, so a
    positive never enters the negative set.

    Shape: conf_loss [A] or [B, A] (cross-entropy against background), positive bool, same shape
    -> bool, same shape.
    """
    rank = _descending_rank(conf_loss, positive)
    return (rank < _hard_count(positive, neg_pos_ratio)) & ~positive


def weak_negative_mask(
    conf_loss: torch.Tensor, positive: torch.Tensor, neg_pos_ratio: int = 3, divisor: int = 3
) -> torch.Tensor:
    """Weak negative mining (Kim et al. 2019, Sec. 3.2): the set Ñeg of Eq. (2).

    Of the hard negatives Neg (:func:`hard_negative_mask`), the ``floor(|Neg| / divisor)`` with the
    lowest confidence loss: ``num_pos`` of them when there are enough negatives. The highest-loss
    negatives are the likeliest missed objects, so they are left out of the loss.

    Shape: conf_loss [A] or [B, A], positive bool, same shape -> bool, same shape.
    """
    rank = _descending_rank(conf_loss, positive)
    hard = _hard_count(positive, neg_pos_ratio)
    return (rank < hard) & (rank >= hard - hard // divisor) & ~positive


def negative_mask(mode: str, conf_loss: torch.Tensor, positive: torch.Tensor, neg_pos_ratio: int = 3) -> torch.Tensor:
    """Negatives in the background term of the confidence loss for a Table 4 setting.

    ``mode``: "hard" (Eq. 1, SSD), "weak" (Eq. 2, WST) or "none" ("Mask": no negative is used).
    Positives always enter the loss. Shape: [A] or [B, A] -> bool, same shape.
    """
    if mode == "hard":
        return hard_negative_mask(conf_loss, positive, neg_pos_ratio)
    if mode == "weak":
        return weak_negative_mask(conf_loss, positive, neg_pos_ratio)
    if mode == "none":
        return torch.zeros_like(positive, dtype=torch.bool)
    raise ValueError(f"unknown negative mode {mode!r}; valid: {', '.join(NEGATIVE_MODES)}")


@dataclass(frozen=True)
class WSTSwitches:
    """One row of the WST ablation (Kim et al. 2019, Table 4 and Sec. 5.1).

    srrs: pseudo-labels by SRRS >= threshold (Algorithm 1) instead of detection score >= threshold.
    negatives: "hard" (Eq. 1), "none" (column "Mask") or "weak" (column "Weak Mask", Eq. 2).
    threshold: epsilon of Algorithm 1; "0.9 without SRRS, and 0.8 with SRRS" (Sec. 5.1).
    box_loss: localization loss on pseudo-boxes; off in every row (ST "without localization loss",
    Sec. 4.3; WST does "not update the network for bounding box regression", Sec. 3.2).
    """

    srrs: bool
    negatives: str
    threshold: float
    box_loss: bool = False


ABLATION_ROWS = {  # Table 4: (SRRS, negatives); mAP on Clipart1k in the comment
    "A": (False, "hard"),  # ST, 10.7
    "B": (True, "hard"),  # SRRS, 10.5
    "C": (False, "none"),  # Mask, 16.8
    "D": (True, "none"),  # SRRS+Mask, 29.2
    "E": (False, "weak"),  # Weak Mask, 31.3
    "F": (True, "weak"),  # SRRS+Weak Mask, 33.8: the proposed WST
}


def default_threshold(use_srrs: bool) -> float:
    """Epsilon of Algorithm 1 when none is given: "0.9 without SRRS, and 0.8 with SRRS" (Sec. 5.1)."""
    return 0.8 if use_srrs else 0.9


def ablation_switches(row: str) -> WSTSwitches:
    """Settings of a row ("A".."F") of Table 4 in Kim et al. 2019; "F" is WST."""
    if row not in ABLATION_ROWS:
        raise ValueError(f"unknown Table 4 row {row!r}; valid: {', '.join(ABLATION_ROWS)}")
    use_srrs, negatives = ABLATION_ROWS[row]
    return WSTSwitches(srrs=use_srrs, negatives=negatives, threshold=default_threshold(use_srrs))
