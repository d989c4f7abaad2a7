"""Small frozen records that flow between the engine, adapters, policies and the store."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ConfigError


@dataclass(frozen=True)
class SegPrediction:
    """Raw network output for a batch.

    Shape:
        logits: [B, C, H, W] at the input's size (adapters upsample their output bilinearly),
        float32, or the autocast type under mixed precision.
    Policies compute ``log p`` in float32 from the logits (never from saturated softmax).
    """

    logits: torch.Tensor


@dataclass(frozen=True)
class SegPseudoLabels:
    """Selected pseudo-labels for a batch.

    Shape:
        labels: [B, H, W] int64, ``ignore_index`` where not selected.
        confidence: [B, H, W] float32, the softmax probability of the assigned class (0 where ignored).
    """

    labels: torch.Tensor
    confidence: torch.Tensor


@dataclass(frozen=True)
class RoundLabels:
    """What one round's labelling stored, per class: the ``pseudo`` part of the round's record in
    metrics.jsonl, read by the console, TensorBoard, the plots, ``labels summary`` and the demo.

    ``unit`` is "pixels" (segmentation) or "boxes" (detection). ``selected`` [C]: labels stored per
    class. Offline rounds give ``thresholds`` [C] (the policy's fitted ones), ``predicted`` [C]
    (pixels predicted as each class in pass 1) and ``selected_share`` (selected / predicted);
    online rounds give the policy's one ``threshold``. ``precision`` [C] and ``precision_overall``
    are measured against target ground truth when the split has it (reporting only, never trained
    on). ``selection`` (boxes): what the policy's threshold saw over every image's final detections
    (:func:`selftrain.detection.selection_summary`), so a round that kept nothing says why.
    """

    unit: str
    selected: list[int]
    thresholds: list[float] | None = None
    threshold: float | None = None
    predicted: list[int] | None = None
    precision: list[float | None] | None = None
    precision_overall: float | None = None
    selected_share: float | None = None
    selection: dict[str, Any] | None = None

    def class_thresholds(self) -> list[float]:
        """One threshold per class [C] (the online policy's one threshold repeated)."""
        if self.thresholds is not None:
            return list(self.thresholds)
        return [float("nan") if self.threshold is None else float(self.threshold)] * len(self.selected)

    def to_dict(self) -> dict[str, Any]:
        """The JSON record: ``selected_pixels`` / ``thresholds`` for pixels, ``selected_boxes`` /
        ``threshold`` for boxes, plus the precision keys and (when present) ``predicted_pixels``,
        ``selection``."""
        out: dict[str, Any]
        if self.unit == "boxes":
            out = {"selected_boxes": list(self.selected), "threshold": self.threshold}
        else:
            out = {"selected_pixels": list(self.selected), "thresholds": self.class_thresholds()}
            if self.predicted is not None:
                out["predicted_pixels"] = list(self.predicted)
        out.update(precision=self.precision, precision_overall=self.precision_overall,
                   selected_share=self.selected_share)
        if self.selection is not None:
            out["selection"] = self.selection
        return out

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> RoundLabels:
        """Read a record written by :meth:`to_dict`, or by older releases (detection rounds then
        said ``selected_pixels`` and repeated the one threshold per class)."""
        boxes = "selected_boxes" in record or "selection" in record
        selected = record.get("selected_boxes", record.get("selected_pixels")) or []
        thresholds = record.get("thresholds")
        threshold = record.get("threshold")
        if boxes and threshold is None and thresholds:
            threshold, thresholds = thresholds[0], None
        return cls(unit="boxes" if boxes else "pixels", selected=list(selected), thresholds=thresholds,
                   threshold=threshold, predicted=record.get("predicted_pixels"), precision=record.get("precision"),
                   precision_overall=record.get("precision_overall"), selected_share=record.get("selected_share"),
                   selection=record.get("selection"))


@dataclass(frozen=True)
class StepOutputs:
    """What ``Adapter.forward_train`` returns: named unweighted losses, logits and feature taps."""

    losses: dict[str, torch.Tensor]
    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    rois: RoIRecord | None = None  # two-stage detectors, when a loss term asked (``request_rois``)


@dataclass(frozen=True)
class StepBatch:
    """One training step's outputs, handed to loss terms (``selftrain.losses``).

    ``source`` / ``target``: the step's forward outputs of each domain (None where the phase has
    none); ``progress``: the phase's training progress in [0, 1]; ``adapter`` and ``target_images``
    for a term that makes its own forward pass (BSR).
    """

    source: StepOutputs | None
    target: StepOutputs | None
    step: int
    progress: float
    adapter: Any = None
    target_images: Any = None


@dataclass(frozen=True)
class DetPrediction:
    """Detections for one image, after NMS, plus the raw candidates that SRRS needs.

    Shape:
        boxes: [M, 4] float32 xyxy in pixels of the input image; scores: [M]; labels: [M] int64 in 1..K.
        raw_boxes: [N, 4] the pre-NMS candidate boxes (decoded, clipped), or None.
        raw_probs: [N, K + 1] softmax class probabilities of the candidates (column 0 = background), or None.
        class_candidates: the per-class pre-NMS lists that NMS reduced to ``boxes`` (adapter option
        ``srrs_candidates: per_class``): {"boxes": [N', 4], "scores": [N'], "labels": [N'] in 1..K}, or None.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    raw_boxes: torch.Tensor | None = None
    raw_probs: torch.Tensor | None = None
    class_candidates: dict[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class Tap:
    """A named backbone feature map that a loss term can read from ``StepOutputs.features``.

    ``channels``: C of the map [B, C, H / stride, W / stride]; ``stride``: input pixels per cell (in the
    network's resized frame). Declared by ``feature_taps()`` of a detection adapter.
    """

    name: str
    channels: int
    stride: int


class TapError(ConfigError, ValueError):
    """A loss term asked an adapter for a tap or a record it cannot give (unknown, frozen, or a
    single-stage detector asked for RoIs); the CLI prints it as one line, exit code 2."""


@dataclass(frozen=True)
class RoIRecord:
    """The RoIs of one Faster R-CNN forward pass, per image, as alignment terms read them.

    R = sum of ``counts`` (R_i per image), K object classes (class 0 background); boxes in the
    network-input frame (after the detector's resize), xyxy pixels.

    Shape:
        boxes: one [R_i, 4] per image: the sampled RoIs (labelled images) or the unlabelled sample.
        counts: [R_i] per image, to split the [R, ...] tensors below.
        labels: one int64 [R_i] per image (0 = background) on labelled images, None unlabelled.
        objectness: one [R_i] per image, the RPN's probability (ground-truth boxes that the RoI
            sampler adds to the proposals of labelled images count as 1.0).
        logits: [R, K + 1]; regression: [R, 4 (K + 1)] (with the graph, as the losses use them).
        refined: [R, 4] the decoded box of each RoI's argmax foreground class, clipped, detached.
        pooled: [R, C, 7, 7] the RoIAlign output before the box head (with the graph), or None
            unless asked (``request_rois(pooled=True)``).
        image_sizes: (h, w) per image after the resize.
        input: [B, 3, H, W] the resized images before normalisation, in [0, 1], zero-padded.
    """

    boxes: list[torch.Tensor]
    counts: list[int]
    labels: list[torch.Tensor] | None
    objectness: list[torch.Tensor]
    logits: torch.Tensor
    regression: torch.Tensor
    refined: torch.Tensor
    pooled: torch.Tensor | None
    image_sizes: list[tuple[int, int]]
    input: torch.Tensor
