"""Small frozen records that flow between the engine, adapters, policies and the store."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


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
class StepOutputs:
    """What ``Adapter.forward_train`` returns: named unweighted losses, logits and feature taps."""

    losses: dict[str, torch.Tensor]
    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)


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
