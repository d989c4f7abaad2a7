"""Every online policy (registry entries that are not offline): the interface the engine and the
tasks call, on the predictions of a real tiny detector, and one training step through the task."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from selftrain.adapters import create_adapter
from selftrain.detection import (ABLATION_ROWS, NEGATIVE_MODES, ablation_switches, keep_by_srrs, prediction_srrs,
                                 select_confident)
from selftrain.policies import POLICIES, create_policy
from selftrain.tasks import DetectionTask, SegmentationTask
from selftrain.teachers import make_teacher
from selftrain.types import DetPrediction



def make(name: str, **options):
    prior = {"prior": np.full((4, 8, 8), 1 / 64, dtype=np.float32)} if name.endswith("_sp") else {}
    return create_policy(name, **prior, **options)


ONLINE = POLICIES.names(kind="online")
DETECTION_ONLINE = POLICIES.names(task="detection", kind="online")
SEGMENTATION_ONLINE = POLICIES.names(task="segmentation", kind="online")
K = 3  # object classes of the tiny detector


def tiny_detector():
    """Few detections and candidates per image: SRRS costs an IoU matrix of the two."""
    torch.manual_seed(0)
    return create_adapter("tiny_ssd", num_classes=K, size=64, width=16, detections_per_img=20, raw_candidates=200)


def test_online_policies_are_the_detection_and_teacher_family():
    assert ONLINE == ["det_st", "mean_teacher", "wst"]
    assert set(ONLINE) == set(DETECTION_ONLINE) | set(SEGMENTATION_ONLINE)  # each one is usable for some task


@pytest.fixture(scope="module")
def detector():
    return tiny_detector()


@pytest.fixture(scope="module")
def images():
    gen = torch.Generator().manual_seed(1)
    return [torch.rand(3, 64, 64, generator=gen) for _ in range(2)]


@pytest.fixture(scope="module", params=["per_class", "any_class"])
def predictions(request, detector, images):
    """What the teacher hands the policy: the tiny detector's predictions in both SRRS readings, and
    an image without detections."""
    detector.srrs_candidates = request.param
    preds = detector.predict(images)
    detector.srrs_candidates = "per_class"
    no_labels = torch.zeros(0, dtype=torch.int64)
    lists = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": no_labels}
    empty = DetPrediction(boxes=torch.zeros(0, 4), scores=torch.zeros(0), labels=no_labels,
                          raw_boxes=torch.zeros(0, 4), raw_probs=torch.zeros(0, K + 1),
                          class_candidates=lists if request.param == "per_class" else None)
    assert all(len(p.scores) > 1 for p in preds)  # the untrained detector still makes detections
    return [*preds, empty]


@pytest.mark.parametrize("name", ONLINE)
def test_online_policy_interface(name, detector):
    pol = create_policy(name)
    assert pol.offline is False and pol.name == name
    assert isinstance(pol.strong_augment, bool) and isinstance(pol.box_loss, bool)
    assert pol.negatives in NEGATIVE_MODES and pol.criterion in ("srrs", "score")
    teacher = make_teacher(pol.teacher, detector, **pol.teacher_options())
    assert teacher.kind == pol.teacher
    for progress in (0.0, 0.5, 1.0):
        assert 0.0 < pol.epsilon(progress) <= 1.0
    clone = create_policy(name)
    clone.load_state_dict(pol.state_dict())
    other = next(n for n in ONLINE if n != name)
    with pytest.raises(ValueError, match=name):
        create_policy(other).load_state_dict(pol.state_dict())
    with pytest.raises(ValueError, match="negatives"):
        create_policy(name, negatives="soft")


@pytest.mark.parametrize("name", DETECTION_ONLINE)
def test_keep_selects_exactly_the_detections_at_or_above_epsilon(name, predictions):
    pol = create_policy(name)
    for pred in predictions:
        values = pol.reliability(pred)
        assert values.shape == pred.scores.shape and bool(torch.all((values >= 0) & (values <= 1 + 1e-6)))
        epsilon = float(values.median()) if len(values) else 0.5
        made = pol.keep(pred, values, epsilon)
        mask = values >= epsilon
        assert set(made) == {"boxes", "labels", "scores", "srrs"}
        assert made["boxes"].shape == (int(mask.sum()), 4) and torch.equal(made["boxes"], pred.boxes[mask])
        assert torch.equal(made["labels"], pred.labels[mask]) and torch.equal(made["scores"], pred.scores[mask])
        assert made["labels"].dtype == torch.int64 and bool(torch.all((made["labels"] >= 1) & (made["labels"] <= K)))
        if pol.criterion == "srrs":
            assert torch.equal(made["srrs"], values[mask])
        else:
            assert torch.equal(values, pred.scores) and bool(torch.isnan(made["srrs"]).all())
            assert made["srrs"].shape == (int(mask.sum()),)


@pytest.mark.parametrize("name", DETECTION_ONLINE)
@pytest.mark.parametrize("progress", [0.0, 0.7])
def test_what_a_step_trains_on_is_what_the_round_stores(name, progress, predictions):
    """``detections`` (online_step) and ``keep(reliability, epsilon)`` (the stored round, OnlineBoxLabeller) agree."""
    pol = create_policy(name, threshold=0.05)
    made = pol.detections(predictions, progress)
    assert len(made) == len(predictions) and sum(len(m["labels"]) for m in made) > 0
    for m, pred in zip(made, predictions):
        stored = pol.keep(pred, pol.reliability(pred), pol.epsilon(progress))
        for key in ("boxes", "labels", "scores"):
            assert torch.equal(m[key], stored[key]), key
        torch.testing.assert_close(m["srrs"], stored["srrs"], equal_nan=True)


@pytest.mark.parametrize("row", list(ABLATION_ROWS))
def test_wst_rows_select_with_the_functions_of_selftrain_detection(row, predictions):
    """The policy of a Table 4 row is ``ablation_switches(row)`` and keeps what ``keep_by_srrs`` (SRRS)
    or ``select_confident`` (score) keep."""
    pol, switches = create_policy("wst", row=row), ablation_switches(row)
    assert (pol.use_srrs, pol.negatives, pol.threshold, pol.box_loss) == (
        switches.srrs, switches.negatives, switches.threshold, switches.box_loss)
    for pred in predictions:
        for epsilon, made in ((0.2, pol.keep(pred, pol.reliability(pred), 0.2)),
                              (pol.threshold, pol.detections([pred], 0.0)[0])):
            if switches.srrs:
                mask = keep_by_srrs(prediction_srrs(pred, pol.delta), epsilon)
                expected = pred.boxes[mask], pred.scores[mask], pred.labels[mask]
            else:
                expected = select_confident(pred.boxes, pred.scores, pred.labels, epsilon)
            for got, want in zip((made["boxes"], made["scores"], made["labels"]), expected):
                assert torch.equal(got, want)


def test_det_st_is_row_a_and_wst_is_row_f():
    for name, row in (("det_st", "A"), ("wst", "F")):
        pol, switches = create_policy(name), ablation_switches(row)
        assert (pol.use_srrs, pol.negatives, pol.threshold, pol.box_loss) == (
            switches.srrs, switches.negatives, switches.threshold, switches.box_loss)


@pytest.mark.parametrize("name", DETECTION_ONLINE)
def test_a_detection_online_step_trains_the_student(name, images):
    student = tiny_detector()
    pol = create_policy(name, threshold=0.05)
    teacher = make_teacher(pol.teacher, student, **pol.teacher_options())
    batch = {"image": images, "target": [None] * len(images), "id": ["a", "b"]}
    out = DetectionTask(None).online_step(student, teacher, pol, batch, device="cpu", progress=0.5)
    assert out.losses and all(bool(torch.isfinite(v)) for v in out.losses.values())
    sum(out.losses.values()).backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


@pytest.mark.parametrize("name", SEGMENTATION_ONLINE)
def test_a_segmentation_online_step_trains_the_student(name):
    torch.manual_seed(0)
    student = create_adapter("tiny_seg", num_classes=4, width=8)
    pol = create_policy(name, threshold=0.0)
    teacher = make_teacher(pol.teacher, student, **pol.teacher_options())
    batch = {"image": torch.randn(2, 3, 16, 24), "label": torch.zeros(2, 16, 24, dtype=torch.int64), "id": ["a", "b"]}
    out = SegmentationTask(None).online_step(student, teacher, pol, batch, device="cpu", progress=0.5)
    ce = out.losses["ce"]
    assert set(out.losses) == {"ce"} and math.isfinite(ce.item()) and ce.item() > 0
    ce.backward()
    assert any(float(p.grad.abs().sum()) > 0 for p in student.parameters() if p.grad is not None)
    targets, weight, stored = pol.segmentation(teacher.predict(batch["image"]).logits)
    assert targets.shape == (2, 16, 24) and targets.dtype == torch.int64 and weight.shape == (2,)
    assert stored.labels.shape == (2, 16, 24) and bool(torch.all((weight >= 0) & (weight <= 1)))
