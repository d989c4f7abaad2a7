"""SRRS, weak/hard negative mining and the WST ablation (Kim et al., ICCV 2019) against naive oracles."""

from __future__ import annotations

import math

import pytest
import torch

from selftrain.detection import (
    WSTSwitches,
    ablation_switches,
    box_iou,
    epsilon_schedule,
    hard_negative_mask,
    keep_by_srrs,
    negative_mask,
    select_confident,
    srrs,
    weak_negative_mask,
)

from reference import iou_loop


def srrs_loop(boxes, probs, final_boxes, final_labels, delta) -> list[float]:
    """Eq. (3) and Algorithm 1 literally: collect r_i with IoU >= delta, average IoU * P(c*|r_i)."""
    out = []
    for fbox, c in zip(final_boxes.tolist(), final_labels.tolist()):
        terms = []
        for box, p in zip(boxes.tolist(), probs.tolist()):
            overlap = iou_loop(box, fbox)
            if overlap >= delta:
                terms.append(overlap * p[c])
        out.append(sum(terms) / len(terms) if terms else 0.0)
    return out


def random_candidates(seed: int, n=60, k=4):
    """Raw SSD-like candidates jittered around a few objects, their softmax, and final boxes."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(5, 2, generator=g, dtype=torch.float64) * 200 + 50
    size = torch.rand(5, 2, generator=g, dtype=torch.float64) * 60 + 20
    which = torch.randint(0, 5, (n,), generator=g)
    jitter = torch.randn(n, 4, generator=g, dtype=torch.float64) * 8
    boxes = torch.cat([centres[which] - size[which] / 2, centres[which] + size[which] / 2], 1) + jitter
    boxes = torch.cat([torch.minimum(boxes[:, :2], boxes[:, 2:]), torch.maximum(boxes[:, :2], boxes[:, 2:])], 1)
    probs = torch.softmax(torch.randn(n, k + 1, generator=g, dtype=torch.float64) * 2, dim=1)
    lonely = torch.tensor([[400.0, 400.0, 420.0, 430.0]], dtype=torch.float64)  # far from every candidate
    final_boxes = torch.cat([boxes[:6], lonely])
    final_labels = torch.randint(1, k + 1, (7,), generator=g)
    return boxes, probs, final_boxes, final_labels


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("delta", [0.3, 0.5, 0.7])
def test_srrs_matches_equation_3_loop(seed, delta):
    boxes, probs, final_boxes, final_labels = random_candidates(seed)
    got = srrs(boxes, probs, final_boxes, final_labels, delta=delta)
    want = srrs_loop(boxes, probs, final_boxes, final_labels, delta)
    assert got.shape == (7,)
    torch.testing.assert_close(got, torch.tensor(want, dtype=got.dtype), rtol=1e-12, atol=1e-12)
    assert got[-1] == 0.0  # the lonely final box has no supporting region
    assert (got[:-1] > 0).all()  # every other final box supports itself (IoU 1)


def test_srrs_mean_is_over_supporting_regions_only():
    final = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0], [0.0, 0.0, 10.0, 4.0], [50.0, 50, 60, 60]])
    probs = torch.tensor([[0.2, 0.8, 0.0], [0.4, 0.6, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    # Supporting: IoU 1 and IoU exactly 0.5 (>= delta); IoU 0.4 and 0 are left out of N_s.
    got = srrs(boxes, probs, final, torch.tensor([1]), delta=0.5)
    assert got.item() == pytest.approx((1.0 * 0.8 + 0.5 * 0.6) / 2)


def test_srrs_reads_the_final_class_column():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    probs = torch.tensor([[0.1, 0.2, 0.7]])
    got = srrs(boxes, probs, boxes.repeat(2, 1), torch.tensor([1, 2]))
    torch.testing.assert_close(got, torch.tensor([0.2, 0.7]))


def test_srrs_empty_inputs():
    none4, probs = torch.zeros(0, 4), torch.zeros(0, 3)
    assert srrs(none4, probs, torch.tensor([[0.0, 0, 5, 5]]), torch.tensor([2])).tolist() == [0.0]
    assert srrs(
        torch.tensor([[0.0, 0, 5, 5]]), torch.ones(1, 3) / 3, none4, torch.zeros(0, dtype=torch.long)
    ).shape == (0,)


def test_srrs_rejects_mismatched_candidates():
    with pytest.raises(ValueError, match="2 candidate boxes but 3"):
        srrs(torch.zeros(2, 4), torch.zeros(3, 3), torch.zeros(1, 4), torch.tensor([1]))


def test_box_iou_matches_loop():
    boxes, _, final_boxes, _ = random_candidates(7)
    got = box_iou(final_boxes, boxes)
    want = [[iou_loop(a, b) for b in boxes.tolist()] for a in final_boxes.tolist()]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))


def test_keep_by_srrs_is_inclusive():
    scores = torch.tensor([0.79, 0.8, 0.95])
    assert keep_by_srrs(scores).tolist() == [False, True, True]
    assert keep_by_srrs(scores, epsilon=0.9).tolist() == [False, False, True]


@pytest.mark.parametrize(
    "progress, value",
    [(0.0, 0.5), (0.5, 1 / (1 + math.exp(-1.5))), (1.0, 0.9525741268224334)],
)
def test_epsilon_schedule_sec_4_2(progress, value):
    assert epsilon_schedule(progress) == pytest.approx(value, rel=1e-12)


def test_epsilon_schedule_rejects_progress_outside_unit_interval():
    with pytest.raises(ValueError, match="progress"):
        epsilon_schedule(1.5)


def test_select_confident_keeps_order_and_threshold():
    boxes = torch.arange(16.0).view(4, 4)
    scores = torch.tensor([0.95, 0.2, 0.9, 0.89])
    labels = torch.tensor([3, 1, 2, 2])
    b, s, lab = select_confident(boxes, scores, labels, threshold=0.9)
    assert b.tolist() == boxes[[0, 2]].tolist() and s.tolist() == scores[[0, 2]].tolist()
    assert lab.tolist() == [3, 2]
    assert select_confident(boxes, scores, labels, threshold=0.99)[0].shape == (0, 4)


# --- negative mining -------------------------------------------------------------------------


def mining_oracle(loss: list[float], positive: list[bool], ratio=3) -> tuple[set[int], set[int]]:
    """Hard set: the min(ratio*P, #neg) negatives by descending loss; weak set: the lowest-loss third of it."""
    negatives = sorted((i for i, p in enumerate(positive) if not p), key=lambda i: -loss[i])
    hard = negatives[: min(ratio * sum(positive), len(negatives))]
    weak = hard[len(hard) - len(hard) // 3 :]
    return set(hard), set(weak)


def random_mining(seed: int, anchors=200, pos_rate=0.03):
    g = torch.Generator().manual_seed(seed)
    loss = torch.rand(anchors, generator=g, dtype=torch.float64) * 5
    positive = torch.rand(anchors, generator=g) < pos_rate
    return loss, positive


def as_set(mask: torch.Tensor) -> set[int]:
    return set(torch.nonzero(mask).flatten().tolist())


@pytest.mark.parametrize("seed", range(6))
def test_hard_and_weak_negatives_match_sort_oracle(seed):
    loss, positive = random_mining(seed)
    hard, weak = mining_oracle(loss.tolist(), positive.tolist())
    assert as_set(hard_negative_mask(loss, positive)) == hard
    assert as_set(weak_negative_mask(loss, positive)) == weak
    num_pos = int(positive.sum())
    assert len(hard) == 3 * num_pos and len(weak) == num_pos  # |Ñeg| = |Neg| / 3 = num_pos
    values = loss.tolist()
    assert max(values[i] for i in weak) <= min((values[i] for i in hard - weak), default=math.inf)


def test_mining_without_positives_selects_no_negatives():
    loss = torch.rand(50, dtype=torch.float64)
    positive = torch.zeros(50, dtype=torch.bool)  # torchvision: num_negative = 3 * 0
    assert not hard_negative_mask(loss, positive).any()
    assert not weak_negative_mask(loss, positive).any()


def test_mining_caps_at_the_available_negatives():
    loss = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 9.0])
    positive = torch.tensor([False, False, False, False, True, True, True])
    # 3 positives but 4 negatives: |Neg| = min(9, 4) = 4 (no positive creeps in), |Ñeg| = 4 // 3 = 1
    assert as_set(hard_negative_mask(loss, positive)) == {0, 1, 2, 3}
    assert as_set(weak_negative_mask(loss, positive)) == {3}


def test_mining_on_a_batch_is_per_image():
    rows = [random_mining(s) for s in (10, 11, 12)]
    loss = torch.stack([r[0] for r in rows])
    positive = torch.stack([r[1] for r in rows])
    for fn in (hard_negative_mask, weak_negative_mask):
        batched = fn(loss, positive)
        for b in range(3):
            assert torch.equal(batched[b], fn(loss[b], positive[b]))


def test_mining_ignores_the_loss_of_positives():
    loss, positive = random_mining(3)
    loss = loss.clone().requires_grad_(True)  # masks come from a loss that is still in the graph
    bumped = loss.detach().masked_fill(positive, 100.0)
    for fn in (hard_negative_mask, weak_negative_mask):
        assert torch.equal(fn(loss, positive), fn(bumped, positive))


def test_negative_mask_modes():
    loss, positive = random_mining(4)
    assert torch.equal(negative_mask("hard", loss, positive), hard_negative_mask(loss, positive))
    assert torch.equal(negative_mask("weak", loss, positive), weak_negative_mask(loss, positive))
    assert not negative_mask("none", loss, positive).any()
    with pytest.raises(ValueError, match="hard, weak, none"):
        negative_mask("soft", loss, positive)


# --- Table 4 ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row, use_srrs, negatives",
    [
        ("A", False, "hard"),  # ST: no SRRS, no Mask, no Weak Mask (10.7 mAP)
        ("B", True, "hard"),  # SRRS (10.5)
        ("C", False, "none"),  # Mask: "no negative example is used for learning" (16.8)
        ("D", True, "none"),  # SRRS+Mask (29.2)
        ("E", False, "weak"),  # Weak Mask (31.3)
        ("F", True, "weak"),  # SRRS+Weak Mask: the proposed WST (33.8)
    ],
)
def test_ablation_rows_match_table_4(row, use_srrs, negatives):
    threshold = 0.8 if use_srrs else 0.9  # Sec. 5.1: "0.9 without SRRS, and 0.8 with SRRS"
    want = WSTSwitches(srrs=use_srrs, negatives=negatives, threshold=threshold, box_loss=False)
    assert ablation_switches(row) == want


def test_ablation_unknown_row_lists_valid_rows():
    with pytest.raises(ValueError, match="A, B, C, D, E, F"):
        ablation_switches("G")
