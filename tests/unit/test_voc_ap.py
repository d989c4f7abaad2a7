"""voc_ap against an independent loop implementation in the style of py-faster-rcnn's voc_eval.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selftrain.metrics import BoxPrecision, box_hits, voc_ap

# --- reference: py-faster-rcnn lib/datasets/voc_eval.py, adapted ------------------------------
# Changes from the original, each to follow the devkit or our box convention:
#   widths without +1 (continuous coordinates), ovmax >= ovthresh (VOCevaldet.m; the original has >),
#   a stable sort (MATLAB's sort), 11-point thresholds i / 10 (np.arange(0., 1.1, 0.1) gives
#   0.30000000000000004, which drops a recall of exactly 0.3), NaN for a class without positives.


def ref_ap(rec, prec, use_07_metric=False):
    if use_07_metric:
        ap = 0.0
        for t in [i / 10 for i in range(11)]:
            if np.sum(rec >= t) == 0:
                p = 0
            else:
                p = np.max(prec[rec >= t])
            ap = ap + p / 11.0
    else:
        mrec = np.concatenate(([0.0], rec, [1.0]))
        mpre = np.concatenate(([0.0], prec, [0.0]))
        for i in range(mpre.size - 1, 0, -1):
            mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
        i = np.where(mrec[1:] != mrec[:-1])[0]
        ap = np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])
    return ap


def ref_eval(dets, gts, classname, ovthresh=0.5, use_07_metric=False, counts=False):
    class_recs = {}
    npos = 0
    for imagename, g in enumerate(gts):
        m = np.asarray(g["labels"]) == classname
        bbox = np.asarray(g["boxes"], dtype=float).reshape(-1, 4)[m]
        difficult = np.asarray(g.get("difficult", np.zeros(m.size)), dtype=bool).reshape(-1)[m]
        det = [False] * len(bbox)
        npos = npos + sum(~difficult)
        class_recs[imagename] = {"bbox": bbox, "difficult": difficult, "det": det}

    image_ids, confidence, BB = [], [], []
    for imagename, d in enumerate(dets):
        for box, score, label in zip(np.asarray(d["boxes"]).reshape(-1, 4), d["scores"], d["labels"]):
            if label == classname:
                image_ids.append(imagename)
                confidence.append(float(score))
                BB.append([float(x) for x in box])
    confidence = np.array(confidence)
    BB = np.array(BB).reshape(-1, 4)

    sorted_ind = np.argsort(-confidence, kind="stable")
    BB = BB[sorted_ind, :]
    image_ids = [image_ids[x] for x in sorted_ind]

    nd = len(image_ids)
    tp = np.zeros(nd)
    fp = np.zeros(nd)
    for d in range(nd):
        R = class_recs[image_ids[d]]
        bb = BB[d, :].astype(float)
        ovmax = -np.inf
        BBGT = R["bbox"].astype(float)

        if BBGT.size > 0:
            ixmin = np.maximum(BBGT[:, 0], bb[0])
            iymin = np.maximum(BBGT[:, 1], bb[1])
            ixmax = np.minimum(BBGT[:, 2], bb[2])
            iymax = np.minimum(BBGT[:, 3], bb[3])
            iw = np.maximum(ixmax - ixmin, 0.0)
            ih = np.maximum(iymax - iymin, 0.0)
            inters = iw * ih
            uni = (bb[2] - bb[0]) * (bb[3] - bb[1]) + (BBGT[:, 2] - BBGT[:, 0]) * (BBGT[:, 3] - BBGT[:, 1]) - inters
            overlaps = inters / uni
            ovmax = np.max(overlaps)
            jmax = np.argmax(overlaps)

        if ovmax >= ovthresh:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d] = 1.0
                    R["det"][jmax] = 1
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0

    if counts:
        return int(tp.sum()), int(fp.sum())
    if npos == 0:
        return float("nan")
    fp = np.cumsum(fp)
    tp = np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return ref_ap(rec, prec, use_07_metric)


# --- random scenes --------------------------------------------------------------------------

K = 6  # class 5: detections but no ground truth; class 6: ground truth but no detections


def random_scene(seed: int, images=12):
    rng = np.random.default_rng(seed)
    dets, gts = [], []
    for i in range(images):
        m = 0 if i % 4 == 3 else int(rng.integers(1, 6))  # every fourth image has no ground truth
        xy = rng.uniform(0, 300, (m, 2))
        gt_boxes = np.concatenate([xy, xy + rng.uniform(20, 120, (m, 2))], axis=1)
        gt_labels = rng.choice([1, 2, 3, 4, 6], m)
        difficult = rng.random(m) < 0.2
        gts.append({"boxes": gt_boxes, "labels": gt_labels, "difficult": difficult})
        dets.append(random_detections(rng, gt_boxes, gt_labels))
    return dets, gts


def random_detections(rng, gt_boxes, gt_labels):
    """Jittered hits (some with the wrong class), duplicates on the same GT, and random boxes."""
    hit = rng.random(len(gt_boxes)) < 0.8
    src = np.concatenate([np.flatnonzero(hit), rng.choice(len(gt_boxes), min(2, len(gt_boxes)), replace=False)])
    hits = gt_boxes[src] + rng.normal(0, 6, (len(src), 4))
    labels = np.where(rng.random(len(src)) < 0.85, gt_labels[src], rng.integers(1, 6, len(src)))
    labels = np.where(labels == 6, 1, labels)  # nothing is ever detected as class 6
    xy = rng.uniform(0, 300, (4, 2))
    noise = np.concatenate([xy, xy + rng.uniform(10, 100, (4, 2))], axis=1)
    boxes = np.concatenate([hits, noise])
    boxes = np.concatenate([np.minimum(boxes[:, :2], boxes[:, 2:]), np.maximum(boxes[:, :2], boxes[:, 2:])], 1)
    labels = np.concatenate([labels, rng.integers(1, 6, 4)])
    return {"boxes": boxes, "scores": rng.random(len(boxes)), "labels": labels}


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("use_07", [False, True])
@pytest.mark.parametrize("iou", [0.5, 0.7])
def test_matches_voc_eval_reference(seed, use_07, iou):
    dets, gts = random_scene(seed)
    mean, per_class = voc_ap(dets, gts, num_classes=K, iou=iou, use_07=use_07)
    want = np.array([ref_eval(dets, gts, k, iou, use_07) for k in range(1, K + 1)])
    np.testing.assert_allclose(per_class, want, rtol=1e-12, atol=1e-12)
    assert np.isnan(per_class[4]) and per_class[5] == 0.0  # no GT -> NaN; GT but no detection -> 0
    assert mean == pytest.approx(np.nanmean(want), rel=1e-12)
    assert 0.0 < mean < 1.0  # the scenes are neither trivial nor hopeless


def test_random_scenes_contain_every_case():
    """Guards the fixture above: duplicates, difficult boxes, empty images, both missing classes."""
    dets, gts = random_scene(0)
    assert any(g["difficult"].any() for g in gts) and any(len(g["labels"]) == 0 for g in gts)
    assert all(5 not in g["labels"] for g in gts) and any(5 in d["labels"] for d in dets)
    assert all(6 not in d["labels"] for d in dets) and any(6 in g["labels"] for g in gts)
    assert sum(len(d["labels"]) for d in dets) > sum(len(g["labels"]) for g in gts)  # duplicates


def as_torch(records):
    return [{k: torch.as_tensor(v) for k, v in r.items()} for r in records]


def test_tensor_and_array_inputs_agree():
    dets, gts = random_scene(1)
    got = voc_ap(as_torch(dets), as_torch(gts), num_classes=K)
    want = voc_ap(dets, gts, num_classes=K)
    assert got[0] == want[0]
    np.testing.assert_array_equal(got[1], want[1])


# --- hand-computed cases --------------------------------------------------------------------


def det(boxes, scores, labels):
    return {"boxes": np.array(boxes, float).reshape(-1, 4), "scores": np.array(scores), "labels": np.array(labels)}


def gt(boxes, labels, difficult=None):
    out = {"boxes": np.array(boxes, float).reshape(-1, 4), "labels": np.array(labels)}
    if difficult is not None:
        out["difficult"] = np.array(difficult, bool)
    return out


A, B = [0, 0, 10, 10], [20, 20, 40, 40]


@pytest.mark.parametrize("use_07", [False, True])
def test_one_perfect_detection_is_ap_1(use_07):
    mean, per_class = voc_ap([det([A], [0.9], [1])], [gt([A], [1])], num_classes=1, use_07=use_07)
    assert mean == 1.0 and per_class.tolist() == [1.0]


def test_duplicate_is_a_false_positive():
    # scores 0.9 (A), 0.8 (A again), 0.7 (B): rec .5 .5 1, prec 1 .5 2/3
    dets = [det([A, A, B], [0.9, 0.8, 0.7], [1, 1, 1])]
    gts = [gt([A, B], [1, 1])]
    assert voc_ap(dets, gts, 1)[0] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert voc_ap(dets, gts, 1, use_07=True)[0] == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)
    assert voc_ap([det([A, B], [0.9, 0.7], [1, 1])], gts, 1)[0] == 1.0


def test_detection_on_difficult_box_is_ignored():
    dets = [det([B, A], [0.9, 0.8], [1, 1])]
    assert voc_ap(dets, [gt([A, B], [1, 1], [False, True])], 1)[0] == 1.0
    assert voc_ap(dets, [gt([A, B], [1, 1], [False, False])], 1)[0] == 1.0
    assert voc_ap(dets, [gt([A], [1])], 1)[0] == pytest.approx(0.5)  # the same box on no GT: a FP


def test_difficult_boxes_do_not_count_as_positives():
    # one of two positives is difficult and missed: recall is still 1
    assert voc_ap([det([A], [0.9], [1])], [gt([A, B], [1, 1], [False, True])], 1)[0] == 1.0
    assert np.isnan(voc_ap([det([A], [0.9], [1])], [gt([A], [1], [True])], 1)[0])


def test_class_without_ground_truth_is_nan_and_left_out_of_the_mean():
    dets = [det([A, B], [0.9, 0.8], [1, 2])]
    mean, per_class = voc_ap(dets, [gt([A], [1])], num_classes=3)
    assert per_class[0] == 1.0 and np.isnan(per_class[1]) and np.isnan(per_class[2])
    assert mean == 1.0


def test_iou_threshold_is_inclusive_and_coordinates_continuous():
    gts = [gt([A], [1])]
    assert voc_ap([det([[0, 0, 10, 5]], [0.9], [1])], gts, 1)[0] == 1.0  # IoU exactly 0.5
    # IoU 0.49 without +1; the devkit's +1 widths would give 11*5.9/121 = 0.536 and a TP
    assert voc_ap([det([[0, 0, 10, 4.9]], [0.9], [1])], gts, 1)[0] == 0.0


def test_11_point_counts_a_recall_of_exactly_0_3():
    boxes = [[20 * i, 0, 20 * i + 10, 10] for i in range(10)]
    gts = [gt(boxes, [1] * 10)]
    dets = [det(boxes[:3], [0.9, 0.8, 0.7], [1, 1, 1])]  # recall 0.3 at precision 1
    assert voc_ap(dets, gts, 1, use_07=True)[0] == pytest.approx(4 / 11)  # t = 0, .1, .2, .3
    assert voc_ap(dets, gts, 1)[0] == pytest.approx(0.3)


def test_sorting_is_global_across_images():
    # image 0's low-scoring FP ranks after image 1's TP: rec .5 1 1, prec 1 1 2/3 -> AP 1
    dets = [det([A, B], [0.9, 0.1], [1, 1]), det([A], [0.5], [1])]
    gts = [gt([A], [1]), gt([A], [1])]
    assert voc_ap(dets, gts, 1)[0] == 1.0


def test_empty_inputs():
    mean, per_class = voc_ap([], [], num_classes=2)
    assert np.isnan(mean) and per_class.shape == (2,) and np.isnan(per_class).all()
    mean, per_class = voc_ap([det([], [], [])], [gt([A], [2])], num_classes=2)
    assert per_class[1] == 0.0 and mean == 0.0


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="1 images of detections but 2"):
        voc_ap([det([A], [0.9], [1])], [gt([A], [1]), gt([A], [1])], 1)
    with pytest.raises(ValueError, match="label 0 outside 1..2"):
        voc_ap([det([A], [0.9], [0])], [gt([A], [1])], 2)


# --- pseudo-box precision ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_box_precision_counts_the_reference_true_and_false_positives(seed):
    dets, gts = random_scene(seed)
    scored = BoxPrecision(K)
    for d, g in zip(dets, gts):
        scored.update(d, g)
    want = [ref_eval(dets, gts, k, counts=True) for k in range(1, K + 1)]
    assert scored.correct.tolist() == [tp for tp, _ in want]
    assert scored.counted.tolist() == [tp + fp for tp, fp in want]
    assert scored.precision()[5] is None and scored.precision()[4] == 0.0  # no boxes; boxes on no GT
    assert scored.overall() == pytest.approx(sum(tp for tp, _ in want) / sum(tp + fp for tp, fp in want))


def test_box_precision_by_hand():
    scored = BoxPrecision(2)
    # class 1: A twice (one correct, one duplicate), B on a difficult box (not counted); class 2: a miss
    boxes, truth = det([A, A, B, B], [0.8, 0.9, 0.7, 0.6], [1, 1, 1, 2]), gt([A, B], [1, 1], [False, True])
    assert box_hits(boxes, truth, 2).tolist() == [0, 1, -1, 0]  # the higher score takes the object
    scored.update(boxes, truth)
    scored.update(det([], [], []), gt([A], [2]))  # an image without boxes changes nothing
    assert scored.precision() == [0.5, 0.0] and scored.overall() == pytest.approx(1 / 3)
    assert BoxPrecision(2).overall() is None
