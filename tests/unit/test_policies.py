"""ST / CBST / CBST-SP against a naive sort-based implementation of the paper's Algorithms 1 and 2."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from selftrain.policies import create_policy
from selftrain.policies import functional as F
from selftrain.types import SegPrediction


def naive_thresholds(pot: np.ndarray, portion: float, class_balanced: bool, valid: np.ndarray | None = None):
    """Sort every pixel's max potential (descending) and read rank floor(N*p), 1-based."""
    c = pot.shape[1]
    label = pot.argmax(1)
    conf = pot.max(1)
    if valid is not None:
        label, conf = label[valid], conf[valid]
    else:
        label, conf = label.ravel(), conf.ravel()

    def rank_value(values):
        rank = math.floor(len(values) * portion)
        return 1.0 if rank < 1 else np.sort(values)[::-1][rank - 1]

    if class_balanced:
        return np.array([rank_value(conf[label == k]) for k in range(c)])
    return np.full(c, rank_value(conf))


def naive_select(pot: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    ratio = pot / thresholds.reshape(1, -1, 1, 1)
    label = ratio.argmax(1)
    return np.where(ratio.max(1) >= 1.0, label, 255)


def random_probs(seed: int, shape=(3, 6, 16, 20), sharp=3.0, ties=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g) * sharp
    if ties:  # quantised logits give many exactly equal confidences
        logits = torch.round(logits)
    return torch.softmax(logits.double(), dim=1).float()


def random_prior(seed: int, c=6, h=16, w=20) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = rng.random((c, h, w)) + 1e-3
    return q / q.sum(axis=(1, 2), keepdims=True)


@pytest.mark.parametrize("portion", [0.2, 0.5])
@pytest.mark.parametrize("name", ["st", "cbst", "cbst_sp", "st_sp"])
@pytest.mark.parametrize("ties", [False, True])
def test_thresholds_match_sort_oracle(name, portion, ties):
    probs = random_probs(1, ties=ties)
    prior = random_prior(2) if name.endswith("_sp") else None
    pol = create_policy(name, prior=prior) if prior is not None else create_policy(name)
    pol.reset()
    for b in range(probs.shape[0]):  # streaming: one image at a time
        pol.observe(probs[b : b + 1])
    thr = pol.fit(portion)
    pot = probs.double().numpy() * (prior[None] if prior is not None else 1.0)
    expected = naive_thresholds(pot, portion, class_balanced=name.startswith("cbst"))
    np.testing.assert_allclose(thr.numpy(), expected, atol=1e-3, rtol=0)
    labels = pol.select(probs).numpy()
    oracle = naive_select(pot, expected)
    assert labels.dtype == np.int64 and labels.shape == (3, 16, 20)
    assert (labels != oracle).mean() < 0.01


def test_empty_class_keeps_threshold_one_and_selects_nothing():
    probs = random_probs(3)
    probs[:, 5] = 0.0  # class 5 is never predicted
    probs = probs / probs.sum(1, keepdim=True)
    pol = create_policy("cbst")
    pol.observe(probs)
    thr = pol.fit(0.2)
    assert thr[5].item() == 1.0
    assert pol.predicted_pixels[5].item() == 0
    assert not (pol.select(probs) == 5).any()


def test_class_smaller_than_one_rank_keeps_threshold_one():
    probs = torch.zeros(1, 3, 2, 2)
    probs[0, 0] = 0.9
    probs[0, 1] = 0.1
    probs[0, :, 0, 0] = torch.tensor([0.1, 0.1, 0.8])  # class 2 predicted on 1 pixel: floor(1*0.5) = 0
    pol = create_policy("cbst")
    pol.observe(probs)
    thr = pol.fit(0.5)
    assert thr[2].item() == 1.0
    assert thr[0].item() == pytest.approx(0.9, abs=1e-3)


def test_all_ignored_images_do_not_count():
    probs = random_probs(4)
    valid = torch.ones(3, 16, 20, dtype=torch.bool)
    valid[1] = False  # the whole second image is padding
    pol = create_policy("cbst")
    pol.observe(probs, valid=valid)
    thr = pol.fit(0.2)
    pot = probs.double().numpy()
    expected = naive_thresholds(pot, 0.2, True, valid=valid.numpy())
    np.testing.assert_allclose(thr.numpy(), expected, atol=1e-3)
    assert pol.predicted_pixels.sum().item() == 2 * 16 * 20


def test_all_ignored_everything_selects_nothing():
    probs = random_probs(5)
    pol = create_policy("st")
    pol.observe(probs, valid=torch.zeros(3, 16, 20, dtype=torch.bool))
    assert torch.all(pol.fit(0.5) == 1.0)


def test_st_selects_the_requested_portion():
    probs = random_probs(6, shape=(4, 6, 32, 32), sharp=2.0)
    pol = create_policy("st")
    pol.observe(probs)
    pol.fit(0.3)
    share = (pol.select(probs) != 255).float().mean().item()
    assert share == pytest.approx(0.3, abs=0.01)


def test_logits_rank_saturated_pixels_where_softmax_ties():
    """Confident pixels all have softmax exactly 1.0 in float32; their logits still rank them."""
    margins = torch.linspace(20.0, 60.0, 100)
    logits = torch.zeros(1, 2, 1, 100)
    logits[0, 0, 0] = margins
    assert torch.all(torch.softmax(logits, 1)[:, 0] == 1.0)
    pol = create_policy("st")
    pol.observe(SegPrediction(logits=logits))
    pol.fit(0.5)
    labels = pol.select(SegPrediction(logits=logits))[0, 0]
    selected = (labels == 0).nonzero().flatten()
    assert 50 <= len(selected) <= 52
    assert selected.min().item() >= 48  # the largest margins win


def test_precise_log_softmax_agrees_with_float64():
    logits = torch.randn(2, 5, 4, 4) * 10
    ref = torch.log_softmax(logits.double(), 1)
    np.testing.assert_allclose(F.log_softmax_precise(logits).double(), ref, rtol=1e-5, atol=1e-6)


def test_cost_from_logits_equals_the_full_log_softmax_path():
    logits = torch.randn(2, 6, 5, 7) * 8
    label, cost = F.predicted_cost_from_logits(logits)
    ref_label, ref_cost = F.predicted_cost(F.log_softmax_precise(logits))
    assert torch.equal(label, ref_label)
    torch.testing.assert_close(cost, ref_cost, rtol=1e-5, atol=1e-7)


def test_state_dict_round_trip():
    probs = random_probs(7)
    pol = create_policy("cbst")
    pol.observe(probs)
    pol.fit(0.35)
    other = create_policy("cbst")
    other.load_state_dict(pol.state_dict())
    assert torch.equal(other.select(probs), pol.select(probs))
    with pytest.raises(ValueError):
        create_policy("st").load_state_dict(pol.state_dict())


def test_prior_of_another_size_is_resized():
    probs = random_probs(8)
    pol = create_policy("cbst_sp", prior=random_prior(9, h=8, w=10))
    pol.observe(probs)
    pol.fit(0.2)
    assert pol.select(probs).shape == (3, 16, 20)


def test_unknown_policy_lists_options():
    from selftrain.errors import ConfigError

    with pytest.raises(ConfigError, match="cbst_sp"):
        create_policy("cbts")


def test_bad_portion():
    pol = create_policy("st")
    pol.observe(random_probs(1))
    with pytest.raises(ValueError):
        pol.fit(0.0)


def test_rare_classes():
    counts = torch.tensor([100000, 50, 0, 5000])
    assert F.rare_classes(counts, 1e-3).tolist() == [1, 2]
