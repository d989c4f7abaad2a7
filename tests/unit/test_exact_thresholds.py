"""Exact order statistics for ST / CBST / CBST-SP: ``fit(portion, replay=...)`` against a sort.

The reference follows CBST Algorithm 2 in float64: every pixel's largest potential, grouped by
predicted class, sorted in decreasing order, the value at 1-based rank floor(N_c * p) (threshold 1
when that rank is below 1). Prior-weighted potentials (spatial priors summing to 1 over the image)
have costs k ~ 8-15, where reading the threshold off a geometric bin edge is off by ~2 %.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from selftrain.policies import create_policy
from selftrain.policies import functional as F
from selftrain.types import SegPrediction

C, H, W = 6, 48, 64
PORTIONS = [0.2, 0.35, 0.5]


def random_logits(seed: int, batches: int = 4, sharp: float = 3.0, ties: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(2, C, H, W, generator=g) * sharp for _ in range(batches)]
    return [torch.round(z) for z in out] if ties else out  # quantised logits: many equal costs


def random_prior(seed: int) -> np.ndarray:
    """A smooth random prior per class, each class summing to 1 over the image (as built from labels)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:H, 0:W] / np.array([H, W]).reshape(2, 1, 1)
    q = np.stack([np.exp(-((y - rng.random()) ** 2 + (x - rng.random()) ** 2) / 0.1) for _ in range(C)]) + 1e-3
    return q / q.sum(axis=(1, 2), keepdims=True)


def make(name: str, prior: np.ndarray | None):
    return create_policy(name, prior=prior) if name.endswith("_sp") else create_policy(name)


def fitted(name: str, logits: list[torch.Tensor], portion: float, prior=None, exact: bool = True):
    pol = make(name, prior)
    for z in logits:
        pol.observe(SegPrediction(logits=z))
    replay = (lambda: (SegPrediction(logits=z) for z in logits)) if exact else None
    pol.fit(portion, replay=replay)
    return pol


def reference(logits: list[torch.Tensor], portion: float, class_balanced: bool, prior=None):
    """Float64 potentials [N, C, H, W] and sort-based thresholds [C]."""
    pot = torch.softmax(torch.cat(logits).double(), dim=1).numpy()
    if prior is not None:
        pot = pot * prior[None]
    label, conf = pot.argmax(1).ravel(), pot.max(1).ravel()

    def at_rank(values: np.ndarray) -> float:
        rank = math.floor(len(values) * portion)
        return 1.0 if rank < 1 else float(np.sort(values)[::-1][rank - 1])

    if class_balanced:
        return pot, np.array([at_rank(conf[label == c]) for c in range(C)])
    return pot, np.full(C, at_rank(conf))


def reference_labels(pot: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    ratio = pot / thresholds.reshape(1, -1, 1, 1)
    return np.where(ratio.max(1) >= 1.0, ratio.argmax(1), 255)


def check(name: str, logits, portion: float, prior=None) -> None:
    pol = fitted(name, logits, portion, prior)
    pot, expected = reference(logits, portion, name.startswith("cbst"), prior)
    rel = np.abs(pol.thresholds.double().numpy() / expected - 1)
    assert rel.max() <= 1e-4, (name, portion, rel)
    labels = torch.cat([pol.select(SegPrediction(logits=z)) for z in logits]).numpy()
    assert (labels == reference_labels(pot, expected)).mean() >= 0.999


@pytest.mark.parametrize("portion", PORTIONS)
@pytest.mark.parametrize("name", ["cbst_sp", "st_sp"])
def test_prior_weighted_thresholds_match_a_sort(name, portion):
    check(name, random_logits(1), portion, random_prior(2))


@pytest.mark.parametrize("portion", PORTIONS)
@pytest.mark.parametrize("name", ["cbst", "st"])
@pytest.mark.parametrize("ties", [False, True])
def test_plain_thresholds_match_a_sort(name, portion, ties):
    check(name, random_logits(3, ties=ties), portion)


@pytest.mark.parametrize("name", ["cbst_sp", "cbst", "st"])
def test_costs_are_the_exact_float32_order_statistic(name):
    """The fitted cost is the very value at the rank among the float32 costs the policy computes."""
    logits, prior, portion = random_logits(4, ties=name == "cbst"), random_prior(5), 0.35
    pol = fitted(name, logits, portion, prior)
    label, cost = zip(*(pol._predicted_cost(SegPrediction(logits=z))[:2] for z in logits))
    label, cost = torch.cat(label).ravel(), torch.cat(cost).ravel()
    groups = range(C) if name.startswith("cbst") else [None]
    for c, k in zip(groups, pol.costs.tolist()):
        values = torch.sort(cost if c is None else cost[label == c]).values
        rank = math.floor(len(values) * portion)
        assert k == (0.0 if rank < 1 else values[rank - 1].item())
    selected = torch.cat([pol.select(SegPrediction(logits=z)) for z in logits]).ravel()
    if name == "st":  # every pixel at or below the rank's cost, ties included, and nothing else
        assert int((selected != 255).sum()) == int((cost <= pol.costs[0]).sum())


def test_bin_edges_alone_miss_prior_weighted_thresholds():
    """Without the refinement passes CBST-SP's thresholds are off by far more than 1e-4."""
    logits, prior = random_logits(1), random_prior(2)
    pol = fitted("cbst_sp", logits, 0.35, prior, exact=False)
    _, expected = reference(logits, 0.35, True, prior)
    assert np.abs(pol.thresholds.double().numpy() / expected - 1).max() > 1e-3


def count_passes(name: str, logits, portion: float, prior=None) -> int:
    pol = make(name, prior)
    for z in logits:
        pol.observe(SegPrediction(logits=z))
    passes = []

    def replay():
        passes.append(1)
        return (SegPrediction(logits=z) for z in logits)

    pol.fit(portion, replay=replay)
    return len(passes)


def test_one_refinement_pass_from_a_geometric_bin():
    assert count_passes("cbst_sp", random_logits(6), 0.35, random_prior(7)) == 1


def test_saturated_costs_below_the_first_bin_are_exact():
    """Margins over ~69 give costs under COST_MIN (bin 0, ~2^27 float32 patterns): two passes."""
    margins = torch.linspace(70.0, 80.0, 400)
    logits = torch.zeros(1, 2, 20, 20)
    logits[0, 0] = margins.view(20, 20)
    assert F.cost_to_bin(F.predicted_cost_from_logits(logits)[1]).max() == 0
    pol = fitted("st", [logits], 0.3)
    cost = F.predicted_cost_from_logits(logits)[1].ravel()
    assert pol.costs[0].item() == torch.sort(cost).values[math.floor(400 * 0.3) - 1].item()
    assert count_passes("st", [logits], 0.3) == 2


def test_a_window_that_misses_its_rank_falls_back_to_the_full_range():
    costs = torch.rand(1000, generator=torch.Generator().manual_seed(8))
    ranks = torch.tensor([300])
    search = F.RankSearch(ranks, lo=F.cost_patterns(torch.tensor([0.9])), width=torch.tensor([1]))
    while not search.done:
        search.count(torch.zeros_like(costs, dtype=torch.int64), costs)
        search.narrow()
    assert search.costs().item() == torch.sort(costs).values[299].item()


def test_classes_without_a_rank_keep_threshold_one():
    logits = random_logits(9, batches=1)
    logits[0][:, 5] = -50.0  # class 5 never predicted
    pol = fitted("cbst", logits, 0.5)
    assert pol.thresholds[5].item() == 1.0 and pol.costs[5].item() == 0.0


def test_a_replay_that_yields_other_pixels_is_refused():
    logits = random_logits(10, batches=2)
    pol = make("cbst", None)
    for z in logits:
        pol.observe(SegPrediction(logits=z))
    with pytest.raises(RuntimeError, match="replay"):
        pol.fit(0.5, replay=lambda: iter([SegPrediction(logits=logits[0][:1])]))
