"""Detectors under mixed precision: the backbone runs in the autocast type, box maths stays float32."""

from __future__ import annotations

import pytest
import torch

from selftrain.adapters import create_adapter
from selftrain.training import Precision

DETECTORS = [("tiny_ssd", {"width": 16}), ("fasterrcnn_mobilenet", {})]


@pytest.mark.parametrize("name,options", DETECTORS)
def test_boxes_anchors_and_losses_are_float32_under_bf16(name, options):
    torch.manual_seed(0)
    adapter = create_adapter(name, num_classes=3, **options)
    images = [torch.rand(3, 128, 128) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 70.0]]), "labels": torch.tensor([1])}] * 2
    with Precision("bf16").autocast():
        losses = adapter.forward_train(images, targets).losses
        preds = adapter.predict(images)
    assert losses and all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    for p in preds:
        assert p.boxes.dtype == p.scores.dtype == p.raw_boxes.dtype == p.raw_probs.dtype == torch.float32
        # bfloat16 coordinates near 100 px would sit on a 0.5 px grid; float32 ones do not
        assert len(p.boxes) and not torch.equal(p.boxes, p.boxes.bfloat16().float())
