"""Online policies and teachers against direct computations from their papers' definitions."""

from __future__ import annotations

import math

import pytest
import torch

from selftrain.adapters import create_adapter
from selftrain.detection import srrs
from selftrain.policies import create_policy
from selftrain.teachers import EMATeacher, StudentTeacher
from selftrain.types import DetPrediction


def random_prediction(gen: torch.Generator, n_raw: int = 40, n_final: int = 6, k: int = 3) -> DetPrediction:
    xy = torch.rand(n_raw, 2, generator=gen) * 50
    wh = torch.rand(n_raw, 2, generator=gen) * 30 + 5
    raw = torch.cat([xy, xy + wh], 1)
    probs = torch.softmax(torch.randn(n_raw, k + 1, generator=gen) * 3, 1)
    pick = torch.randperm(n_raw, generator=gen)[:n_final]
    labels = probs[pick, 1:].argmax(1) + 1
    return DetPrediction(boxes=raw[pick], scores=probs[pick, 1:].max(1).values, labels=labels,
                         raw_boxes=raw, raw_probs=probs)


def test_wst_keeps_exactly_the_detections_with_srrs_at_least_epsilon():
    gen = torch.Generator().manual_seed(0)
    pol = create_policy("wst", threshold=0.3)
    assert pol.negatives == "weak" and pol.box_loss is False and pol.teacher == "student"
    for _ in range(5):
        pred = random_prediction(gen)
        made = pol.detections([pred], progress=0.5)[0]
        score = srrs(pred.raw_boxes, pred.raw_probs, pred.boxes, pred.labels, 0.5)
        keep = score >= 0.3
        assert torch.equal(made["boxes"], pred.boxes[keep]) and torch.equal(made["labels"], pred.labels[keep])
        torch.testing.assert_close(made["srrs"], score[keep])


def test_det_st_keeps_confident_detections_with_hard_negatives():
    gen = torch.Generator().manual_seed(1)
    pol = create_policy("det_st")
    assert (pol.negatives, pol.threshold, pol.use_srrs) == ("hard", 0.9, False)
    pred = random_prediction(gen)
    made = pol.detections([pred], progress=0.0)[0]
    assert torch.equal(made["scores"], pred.scores[pred.scores >= 0.9]) and torch.isnan(made["srrs"]).all()


def test_table4_rows_and_schedule():
    assert (create_policy("wst", row="C").negatives, create_policy("wst", row="C").use_srrs) == ("none", False)
    assert create_policy("wst", row="C").threshold == 0.9 and create_policy("wst", row="D").threshold == 0.8
    scheduled = create_policy("wst", schedule=True)
    assert scheduled.epsilon(0.0) == pytest.approx(0.5)
    assert scheduled.epsilon(1.0) == pytest.approx(1 / (1 + math.exp(-3)))
    with pytest.raises(ValueError, match="row"):
        create_policy("wst", row="Z")


def test_mean_teacher_segmentation_weights_by_confident_share():
    pol = create_policy("mean_teacher", threshold=0.8)
    logits = torch.zeros(2, 3, 2, 2)
    logits[0, 1] = 10.0  # image 0: every pixel confident class 1
    logits[1, 2, 0, 0] = 10.0  # image 1: one confident pixel of four
    targets, weight, stored = pol.segmentation(logits)
    assert targets[0].eq(1).all() and weight.tolist() == [1.0, 0.25]
    assert stored.labels[1].tolist() == [[2, 255], [255, 255]]
    torch.testing.assert_close(stored.confidence, logits.softmax(1).max(1).values)


def test_ema_teacher_follows_the_mean_teacher_update():
    torch.manual_seed(0)
    student = create_adapter("tiny_seg", num_classes=3)
    teacher = EMATeacher(student, decay=0.99)
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student.model.body[1].running_mean.add_(5.0)
    teacher.update(student, step=1000)
    after, now = teacher.model.state_dict(), student.state_dict()
    name = "body.0.weight"
    torch.testing.assert_close(after[name], 0.99 * before[name] + 0.01 * now[name])
    torch.testing.assert_close(after["body.1.running_mean"], now["body.1.running_mean"])  # buffers copied
    assert teacher.rate(0) == pytest.approx(0.1) and teacher.rate(10_000) == 0.99
    assert not any(p.requires_grad for p in teacher.model.parameters())
    images = torch.randn(1, 3, 16, 16)
    assert torch.equal(StudentTeacher(student).predict(images).logits, student.predict(images).logits)
