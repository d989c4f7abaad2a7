"""Online policies: pseudo-labels made for every target batch while the model trains.

- ``det_st`` and ``wst``: weak self-training for one-stage detectors and its ablation (Kim et al.,
  ICCV 2019, arXiv:1909.00597). The student labels its own batch; a final detection becomes a
  pseudo-box when its score (ST) or its SRRS (Eq. 3) reaches the threshold; the background term
  uses hard, weak (Eq. 2) or no negatives; pseudo-boxes carry no box-regression loss.
- ``mean_teacher``: an EMA teacher (Tarvainen & Valpola 2017) labels a weak view, the student learns
  from a strong view; detections above a confidence threshold, or for segmentation every pixel's
  argmax weighted by the share of pixels above the threshold (DACS/DAFormer, arXiv:2111.14887).

Each class holds settings only; the maths is in :mod:`selftrain.detection`. Detection policies share
one shape: ``reliability(pred)`` is the value of every final detection that the threshold
``epsilon(progress)`` is compared with (``criterion``: "srrs" or "score"), ``keep`` applies it, and
``detections`` does both for a batch; a round's report reads the first two (what was kept and why).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..detection import (ablation_switches, check_negatives, default_threshold, epsilon_schedule, keep_by_srrs,
                         keep_plausible, plausible_boxes, prediction_srrs, select_confident)
from ..types import DetPrediction, SegPseudoLabels


class _Online:
    """Shared bookkeeping: online policies are stateless between rounds."""

    offline = False
    teacher = "student"
    strong_augment = False

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state of policy {state.get('name')!r} cannot load into {self.name!r}")

    def teacher_options(self) -> dict[str, Any]:
        return {}


def confident_boxes(pred: DetPrediction, scores: torch.Tensor, epsilon: float) -> dict[str, torch.Tensor]:
    """The pseudo-boxes of one image by score (``selftrain.detection.select_confident``), without the
    boxes no detector can train on (``selftrain.detection.plausible_boxes``): ``boxes`` [K, 4],
    ``labels``, ``scores`` [K] and ``srrs`` [K] of NaN. Shape: scores [M], the final detections' scores."""
    boxes, kept, labels = select_confident(pred.boxes, scores, pred.labels, epsilon)
    return keep_plausible({"boxes": boxes, "labels": labels, "scores": kept, "srrs": torch.full_like(kept, math.nan)})


def reliable_boxes(pred: DetPrediction, srrs_values: torch.Tensor, epsilon: float) -> dict[str, torch.Tensor]:
    """The pseudo-boxes of one image by SRRS (``selftrain.detection.keep_by_srrs``), without the boxes
    no detector can train on: ``boxes`` [K, 4], ``labels``, ``scores``, ``srrs`` [K].
    Shape: srrs_values [M] over the final detections."""
    keep = keep_by_srrs(srrs_values, epsilon) & plausible_boxes(pred.boxes)
    return {"boxes": pred.boxes[keep], "labels": pred.labels[keep], "scores": pred.scores[keep],
            "srrs": srrs_values[keep]}


class WeakSelfTraining(_Online):
    """WST (``srrs=True, negatives="weak"``) and every row of its Table 4 ablation.

    Args:
        srrs: keep a detection when its SRRS >= threshold (Algorithm 1) instead of its score.
        negatives: "hard" (Eq. 1), "weak" (Eq. 2) or "none" (the "Mask" column).
        threshold: epsilon; the paper uses 0.8 with SRRS and 0.9 without (Sec. 5.1).
        delta: IoU that makes a raw candidate a supporting region (0.5).
        schedule: epsilon = 1 / (1 + exp(-3 p)) with p the round's progress (Sec. 4.2) instead of a constant.
        box_loss: regress pseudo-boxes too (off in the paper).
        row: a Table 4 row "A".."F" that sets ``srrs`` and ``negatives`` (and the threshold unless given),
            as ``selftrain.detection.ablation_switches`` reads it.
    """

    def __init__(self, *, name: str = "wst", srrs: bool = True, negatives: str = "weak", threshold: float | None = None,
                 delta: float = 0.5, schedule: bool = False, box_loss: bool = False, row: str | None = None,
                 num_classes: int | None = None, ignore_index: int = 255) -> None:
        if row is not None:
            switches = ablation_switches(row)
            srrs, negatives = switches.srrs, switches.negatives
        self.name, self.use_srrs, self.negatives, self.delta = name, srrs, check_negatives(negatives), delta
        self.threshold = threshold if threshold is not None else default_threshold(srrs)
        self.schedule, self.box_loss = schedule, box_loss

    @property
    def criterion(self) -> str:
        return "srrs" if self.use_srrs else "score"

    def epsilon(self, progress: float) -> float:
        return epsilon_schedule(min(max(progress, 0.0), 1.0)) if self.schedule else self.threshold

    def reliability(self, pred: DetPrediction) -> torch.Tensor:
        """SRRS (Eq. 3, from the candidates the adapter gave: ``selftrain.detection.prediction_srrs``)
        or the score of every final detection. Shape: -> [M]."""
        return prediction_srrs(pred, self.delta) if self.use_srrs else pred.scores

    def keep(self, pred: DetPrediction, values: torch.Tensor, epsilon: float) -> dict[str, torch.Tensor]:
        """Algorithm 1, line 8 (or the score threshold): the detections whose ``values >= epsilon``.
        Shape: values [M] = ``reliability(pred)``."""
        return reliable_boxes(pred, values, epsilon) if self.use_srrs else confident_boxes(pred, values, epsilon)

    def detections(self, preds: list[DetPrediction], progress: float) -> list[dict[str, torch.Tensor]]:
        """Pseudo-boxes per image: ``boxes`` [K, 4], ``labels`` [K], ``scores`` [K], ``srrs`` [K] (NaN without SRRS)."""
        epsilon = self.epsilon(progress)
        return [self.keep(p, self.reliability(p), epsilon) for p in preds]


class MeanTeacher(_Online):
    """Mean teacher for detection and segmentation.

    Args:
        threshold: teacher confidence a detection (or pixel) needs (0.8).
        decay: EMA decay of the teacher (0.999).
        negatives, box_loss: how detectors learn from the teacher's boxes (hard negatives, no box loss).
    """

    teacher = "ema"
    strong_augment = True

    def __init__(self, *, threshold: float = 0.8, decay: float = 0.999, negatives: str = "hard",
                 box_loss: bool = False, num_classes: int | None = None, ignore_index: int = 255) -> None:
        self.name, self.threshold, self.decay = "mean_teacher", threshold, decay
        self.negatives, self.box_loss, self.ignore_index = check_negatives(negatives), box_loss, ignore_index

    criterion = "score"

    def teacher_options(self) -> dict[str, Any]:
        return {"decay": self.decay}

    def epsilon(self, progress: float) -> float:
        return self.threshold

    def reliability(self, pred: DetPrediction) -> torch.Tensor:
        return pred.scores

    def keep(self, pred: DetPrediction, values: torch.Tensor, epsilon: float) -> dict[str, torch.Tensor]:
        return confident_boxes(pred, values, epsilon)

    def detections(self, preds: list[DetPrediction], progress: float) -> list[dict[str, torch.Tensor]]:
        return [self.keep(p, p.scores, self.threshold) for p in preds]

    def segmentation(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, SegPseudoLabels]:
        """Teacher logits [B, C, H, W] -> (targets [B, H, W] = argmax, weight [B] = share of pixels with
        p_max >= threshold, the stored labels with ``ignore_index`` below the threshold)."""
        probs = F.softmax(logits.float(), dim=1)
        confidence, targets = probs.max(dim=1)
        confident = confidence >= self.threshold
        weight = confident.flatten(1).float().mean(1)
        stored = torch.where(confident, targets, torch.full_like(targets, self.ignore_index))
        return targets, weight, SegPseudoLabels(labels=stored, confidence=confidence)
