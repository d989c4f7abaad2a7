"""SRRS supporting regions under both readings of Algorithm 1 (Kim et al. 2019) against direct computations:
``per_class`` (SSD's own per-class pre-NMS lists) and ``any_class`` (every raw candidate)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import batched_nms

from selftrain.adapters import create_adapter
from selftrain.detection import (
    check_srrs_candidates,
    class_candidates,
    prediction_srrs,
    selection_summary,
    srrs,
    srrs_per_class,
)
from selftrain.policies import create_policy
from selftrain.types import DetPrediction, RoundLabels

from reference import iou_loop


def support_loop(candidates, final_box, final_label, delta, per_class):
    """Algorithm 1, lines 2-6, written out: the (IoU, P(c*|r_i)) of every collected r_i.

    ``candidates``: per_class -> (box, label, score) rows; any_class -> (box, probs) rows."""
    out = []
    for row in candidates:
        overlap = iou_loop(row[0], final_box)
        if per_class and row[1] == final_label and overlap >= delta:
            out.append((overlap, row[2]))
        elif not per_class and overlap >= delta:
            out.append((overlap, row[1][final_label]))
    return out


def eq3(support) -> float:
    return sum(i * p for i, p in support) / len(support) if support else 0.0


# A hand-made SSD output: six default boxes, K = 2, zero box regression (decoded box = default box).
ANCHORS = torch.tensor([[10.0, 10.0, 50.0, 50.0],    # a0: object A
                        [12.0, 10.0, 52.0, 50.0],    # a1: IoU 0.905 with a0
                        [10.0, 14.0, 50.0, 54.0],    # a2: IoU 0.818 with a0
                        [70.0, 70.0, 110.0, 110.0],  # a3: object B
                        [72.0, 72.0, 112.0, 112.0],  # a4: IoU 0.822 with a3
                        [30.0, 30.0, 70.0, 70.0]])   # a5: background
PROBS = torch.tensor([[0.05, 0.90, 0.05],
                      [0.10, 0.60, 0.30],
                      [0.30, 0.005, 0.695],  # on object A, weak in class 1 (below SSD's 0.01), strong in 2
                      [0.10, 0.02, 0.88],
                      [0.20, 0.10, 0.70],
                      [0.985, 0.008, 0.007]])  # below 0.01 in every class: no candidate in either reading


def hand_made_ssd():
    """A tiny_ssd whose post-processing runs on the hand-made output (top-2 per class, NMS 0.45)."""
    model = create_adapter("tiny_ssd", num_classes=2, width=16).model
    model.topk_candidates = 2
    head = {"bbox_regression": torch.zeros(1, 6, 4), "cls_logits": PROBS.log()[None]}
    return model, head


def test_hand_made_ssd_output_supporting_regions_and_srrs_in_both_readings():
    model, head = hand_made_ssd()
    decoded = model.box_coder.decode_single(head["bbox_regression"][0], ANCHORS)
    assert torch.equal(decoded, ANCHORS)
    probs = head["cls_logits"][0].softmax(-1)
    lists = class_candidates(decoded, probs, model.score_thresh, model.topk_candidates)
    # per class, P(c) > 0.01 then the top 2: class 1 {a0 0.90, a1 0.60} (a3, a4 cut by top-k),
    # class 2 {a3 0.88, a4 0.70} (a2's 0.695 cut by top-k); a5 nowhere
    assert torch.equal(lists["labels"], torch.tensor([1, 1, 2, 2]))
    assert torch.equal(lists["boxes"], ANCHORS[[0, 1, 3, 4]])
    torch.testing.assert_close(lists["scores"], torch.tensor([0.90, 0.60, 0.88, 0.70]))
    # NMS of these lists is torchvision's SSD post-processing, exactly
    (det,) = model.postprocess_detections(head, [ANCHORS], [(128, 128)])
    keep = batched_nms(lists["boxes"], lists["scores"], lists["labels"], model.nms_thresh)[: model.detections_per_img]
    assert torch.equal(det["boxes"], lists["boxes"][keep]) and torch.equal(det["labels"], lists["labels"][keep])
    assert torch.equal(det["scores"], lists["scores"][keep])
    assert det["labels"].tolist() == [1, 2] and torch.equal(det["boxes"], ANCHORS[[0, 3]])

    per_class_rows = list(zip(lists["boxes"].tolist(), lists["labels"].tolist(), lists["scores"].tolist()))
    fg = probs[:, 1:].max(1).values >= 0.01  # the any_class candidates (the adapter's raw_score_thresh)
    any_class_rows = list(zip(ANCHORS[fg].tolist(), probs[fg].tolist()))
    assert fg.tolist() == [True] * 5 + [False]
    per_class = srrs_per_class(lists["boxes"], lists["scores"], lists["labels"], det["boxes"], det["labels"], 0.5)
    any_class = srrs(ANCHORS[fg], probs[fg], det["boxes"], det["labels"], 0.5)
    for m, (box, label) in enumerate(zip(det["boxes"].tolist(), det["labels"].tolist())):
        assert per_class[m].item() == pytest.approx(eq3(support_loop(per_class_rows, box, label, 0.5, True)), rel=1e-6)
        assert any_class[m].item() == pytest.approx(eq3(support_loop(any_class_rows, box, label, 0.5, False)), rel=1e-6)
    # object A (class 1): per class, a0 and a1 support it; any class adds a2, weak in class 1
    a0, a1, a2, a3, a4 = ANCHORS[:5].tolist()
    a01, a02 = iou_loop(a0, a1), iou_loop(a0, a2)
    assert [round(i, 4) for i, _ in support_loop(per_class_rows, a0, 1, 0.5, True)] == [1.0, 0.9048]
    assert per_class[0].item() == pytest.approx((0.90 + a01 * 0.60) / 2, rel=1e-5)  # 0.7214
    assert any_class[0].item() == pytest.approx((0.90 + a01 * 0.60 + a02 * 0.005) / 3, rel=1e-5)  # 0.4823
    # object B (class 2): a3 and a4 in both readings
    a34 = iou_loop(a3, a4)
    assert per_class[1].item() == pytest.approx((0.88 + a34 * 0.70) / 2, rel=1e-5)
    assert any_class[1].item() == pytest.approx(per_class[1].item(), rel=1e-6)


def random_ssd_output(seed: int, a: int = 300, k: int = 4):
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(6, 2, generator=g) * 90 + 20
    which = torch.randint(0, 6, (a,), generator=g)
    size = torch.rand(a, 2, generator=g) * 30 + 10
    boxes = torch.cat([centres[which] - size / 2, centres[which] + size / 2], 1).clamp(0, 128)
    probs = torch.softmax(torch.randn(a, k + 1, generator=g) * 3, 1)
    return boxes, probs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_class_candidates_reduce_to_torchvisions_ssd_detections(seed):
    boxes, probs = random_ssd_output(seed)
    model = create_adapter("tiny_ssd", num_classes=4, width=16).model
    model.topk_candidates = 20
    regression = model.box_coder.encode_single(boxes, boxes + 0.5)  # decodes back to ``boxes``
    head = {"bbox_regression": regression[None], "cls_logits": probs.log()[None]}
    (det,) = model.postprocess_detections(head, [boxes + 0.5], [(128, 128)])
    decoded = model.box_coder.decode_single(regression, boxes + 0.5).clamp(0, 128)
    lists = class_candidates(decoded, head["cls_logits"][0].softmax(-1), model.score_thresh, model.topk_candidates)
    keep = batched_nms(lists["boxes"], lists["scores"], lists["labels"], model.nms_thresh)[: model.detections_per_img]
    assert torch.equal(det["boxes"], lists["boxes"][keep]) and torch.equal(det["scores"], lists["scores"][keep])
    assert torch.equal(det["labels"], lists["labels"][keep])
    assert all(int((lists["labels"] == c).sum()) <= 20 for c in range(1, 5))
    # against Algorithm 1 written out, for both readings and two deltas
    rows = list(zip(lists["boxes"].tolist(), lists["labels"].tolist(), lists["scores"].tolist()))
    for delta in (0.5, 0.7):
        ours = srrs_per_class(lists["boxes"], lists["scores"], lists["labels"], det["boxes"], det["labels"], delta)
        finals = zip(det["boxes"].tolist(), det["labels"].tolist())
        expected = [eq3(support_loop(rows, b, c, delta, True)) for b, c in finals]
        np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-5, atol=1e-7)
        assert (ours > 0).all()  # every detection supports itself at IoU 1


def test_class_candidates_follow_the_roi_heads_rules():
    """Class-specific boxes, P(c) > threshold, tiny boxes dropped, no top-k (RoIHeads.postprocess_detections)."""
    boxes = torch.tensor([[[0.0, 0, 1, 1], [0, 0, 10, 10], [5, 5, 20, 20]],
                          [[0.0, 0, 1, 1], [3, 3, 3.005, 9], [1, 1, 8, 8]]])  # [R = 2, K + 1 = 3, 4]
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.6, 0.04]])
    lists = class_candidates(boxes, probs, 0.05, min_size=1e-2)
    assert lists["labels"].tolist() == [1, 2] and lists["scores"].tolist() == pytest.approx([0.5, 0.3])
    # RoI 1's class-1 box is 0.005 px wide, its class-2 score 0.04 <= 0.05
    assert torch.equal(lists["boxes"], torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20]]))


def test_empty_candidates_and_detections():
    lists = class_candidates(torch.zeros(0, 4), torch.zeros(0, 3), 0.01, 400)
    assert lists["boxes"].shape == (0, 4) and lists["labels"].dtype == torch.int64
    assert srrs_per_class(lists["boxes"], lists["scores"], lists["labels"], torch.tensor([[0.0, 0, 5, 5]]),
                          torch.tensor([1])).tolist() == [0.0]
    assert srrs_per_class(lists["boxes"], lists["scores"], lists["labels"], torch.zeros(0, 4),
                          torch.zeros(0, dtype=torch.int64)).shape == (0,)
    with pytest.raises(ValueError, match="3 scores"):
        srrs_per_class(torch.zeros(2, 4), torch.zeros(3), torch.zeros(2, dtype=torch.int64), torch.zeros(0, 4),
                       torch.zeros(0, dtype=torch.int64))


def test_prediction_srrs_reads_the_candidates_the_adapter_gave():
    boxes, probs = ANCHORS, PROBS
    lists = class_candidates(boxes, probs, 0.01, 2)
    final = {"boxes": ANCHORS[[0, 3]], "scores": torch.tensor([0.9, 0.88]), "labels": torch.tensor([1, 2])}
    any_pred = DetPrediction(**final, raw_boxes=boxes[:5], raw_probs=probs[:5])
    per_pred = DetPrediction(**final, raw_boxes=boxes[:5], raw_probs=probs[:5], class_candidates=lists)
    assert torch.equal(prediction_srrs(any_pred), srrs(boxes[:5], probs[:5], final["boxes"], final["labels"], 0.5))
    assert torch.equal(prediction_srrs(per_pred), srrs_per_class(lists["boxes"], lists["scores"], lists["labels"],
                                                                 final["boxes"], final["labels"], 0.5))
    with pytest.raises(ValueError, match="candidates"):
        prediction_srrs(DetPrediction(**final))
    policy = create_policy("wst")
    assert torch.equal(policy.reliability(per_pred), prediction_srrs(per_pred))
    assert policy.detections([per_pred], 0.0)[0]["labels"].tolist() == []  # 0.72 and 0.73 < 0.8
    assert create_policy("wst", threshold=0.72).detections([per_pred], 0.0)[0]["labels"].tolist() == [1, 2]
    assert create_policy("wst", threshold=0.72).detections([any_pred], 0.0)[0]["labels"].tolist() == [2]


def test_srrs_candidates_values_are_checked():
    assert check_srrs_candidates("per_class") == "per_class"
    with pytest.raises(ValueError, match="per_class, any_class"):
        check_srrs_candidates("all")


def test_selection_summary_against_numpy():
    values = torch.tensor([0.1, 0.85, 0.3, 0.8, 0.05, 0.79])
    out = selection_summary(values, 0.8)
    assert (out["epsilon"], out["detections"], out["at_least_epsilon"]) == (0.8, 6, 2)
    assert out["share"] == pytest.approx(2 / 6)
    expected = np.quantile(values.double().numpy(), [0.5, 0.9, 0.99, 1.0])
    assert list(out["quantiles"].values()) == pytest.approx(expected.tolist(), rel=1e-12)
    assert list(out["quantiles"]) == ["p50", "p90", "p99", "max"]
    empty = selection_summary(torch.zeros(0), 0.8)
    assert (empty["detections"], empty["at_least_epsilon"], empty["share"], empty["quantiles"]) == (0, 0, None, None)


def test_round_labels_add_the_selection_to_the_record_only_when_there_is_one():
    assert "selection" not in RoundLabels("boxes", [1, 2], threshold=0.8).to_dict()
    selection = {"criterion": "srrs", "candidates": "per_class", **selection_summary(torch.tensor([0.5]), 0.8)}
    record = RoundLabels("boxes", [1, 2], threshold=0.8, selection=selection).to_dict()
    assert record["selection"] == selection and record["threshold"] == 0.8 and record["selected_boxes"] == [1, 2]
    assert "selected_pixels" not in record and "thresholds" not in record
    assert math.isclose(selection["quantiles"]["max"], 0.5)


def test_round_labels_read_their_own_records_and_the_older_box_records():
    boxes = RoundLabels("boxes", [3, 0], threshold=0.6, precision=[0.5, None], precision_overall=0.5,
                        selection={"criterion": "score"})
    assert RoundLabels.from_dict(boxes.to_dict()) == boxes
    pixels = RoundLabels("pixels", [10, 20], thresholds=[0.9, 0.7], predicted=[40, 50], selected_share=30 / 90)
    assert RoundLabels.from_dict(pixels.to_dict()) == pixels
    older = {"selected_pixels": [3, 0], "thresholds": [0.6, 0.6], "precision": None, "precision_overall": None,
             "selected_share": None, "selection": {"criterion": "score"}}
    read = RoundLabels.from_dict(older)
    assert read.unit == "boxes" and read.selected == [3, 0] and read.threshold == 0.6 and read.thresholds is None
    assert read.class_thresholds() == [0.6, 0.6]


def test_default_boxes_give_the_same_lists_in_the_adapter():
    """The adapter's ``class_candidates`` are the lists its own post-processing reduces: each detection
    is one of its class's candidates (IoU 1, same score) in the input image's pixels."""
    torch.manual_seed(0)
    adapter = create_adapter("tiny_ssd", num_classes=3, width=16)
    image = torch.rand(3, 96, 128)
    pred = adapter.predict([image])[0]
    c = pred.class_candidates
    assert len(pred.boxes) > 0 and len(c["boxes"]) >= len(pred.boxes)
    for box, score, label in zip(pred.boxes, pred.scores, pred.labels):
        same = (c["boxes"] == box).all(1) & (c["labels"] == label)
        assert same.any() and torch.equal(c["scores"][same][:1], score[None])
    x = adapter.model.transform([image])[0]
    features = list(adapter.model.backbone(x.tensors).values())
    per_class_cap = adapter.model.topk_candidates
    assert len(adapter.model.anchor_generator(ImageList(x.tensors, x.image_sizes), features)[0]) > per_class_cap
    assert all(int((c["labels"] == k).sum()) <= per_class_cap for k in (1, 2, 3))
