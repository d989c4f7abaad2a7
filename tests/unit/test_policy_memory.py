"""The statistics pass of the offline policies keeps memory bounded by classes x bins, whatever the
size of the target set: memory is measured over a pass on a small and on an eight times larger set.

Tensor memory is what torch's CPU allocator holds at the end of the pass that it did not hold before
(the profiler's allocation records, summed); Python and numpy memory is tracemalloc's peak. A policy
that kept anything per pixel (a float32 cost: 4 bytes, a bool mask: 1 byte) would add at least one
byte per extra pixel; the histogram costs the same for both sets.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from selftrain.policies import create_policy
from selftrain.policies import functional as F
from selftrain.types import SegPrediction

SHAPE = (2, 6, 32, 32)  # one batch of logits: B, C, H, W
SMALL, LARGE = 2, 16  # batches in the two target sets


def make(name: str):
    if name.endswith("_sp"):
        q = np.random.default_rng(0).random(SHAPE[1:]) + 1e-3
        return create_policy(name, prior=q / q.sum(axis=(1, 2), keepdims=True))
    return create_policy(name)


def batch(index: int) -> SegPrediction:
    return SegPrediction(logits=torch.randn(SHAPE, generator=torch.Generator().manual_seed(index)) * 4)


def statistics_pass(policy, batches: int, exact: bool = False) -> None:
    """observe every batch of a target set, then fit: pass 1 of the labeller (and its refinement
    passes over the same batches, drawn again as the labeller reads its cache again)."""
    policy.reset()
    for i in range(batches):
        policy.observe(batch(i))
    policy.fit(0.3, replay=(lambda: (batch(i) for i in range(batches))) if exact else None)


def tensor_bytes_kept(name: str, batches: int, exact: bool = False) -> int:
    """Net tensor allocations of a pass by a new policy (its histogram and resized prior included)."""
    policy = make(name)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        statistics_pass(policy, batches, exact)
    return sum(event.self_cpu_memory_usage for event in prof.key_averages())


def tensor_peak_bytes(name: str, batches: int) -> int:
    """Largest net tensor memory held at any point of an exact pass (allocations in time order)."""
    policy = make(name)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        statistics_pass(policy, batches, exact=True)
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    held, peak = 0, 0
    for event in events:
        held += event.self_cpu_memory_usage
        peak = max(peak, held)
    return peak


def python_peak_bytes(name: str, batches: int, exact: bool = False) -> int:
    statistics_pass(make(name), 1, exact)  # warm-up: one-time caches of torch and Python
    policy = make(name)
    tracemalloc.start()
    try:
        statistics_pass(policy, batches, exact)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("name", ["cbst", "st_sp"])  # logits path with per-class fit; prior path with one threshold
def test_histogram_memory_does_not_grow(name, exact):
    extra_pixels = (LARGE - SMALL) * SHAPE[0] * SHAPE[2] * SHAPE[3]
    small, large = tensor_bytes_kept(name, SMALL, exact), tensor_bytes_kept(name, LARGE, exact)
    histogram = SHAPE[1] * F.BINS * 8  # int64 [C, BINS]
    assert small >= histogram  # the measurement sees the pass's allocations
    assert large - small < extra_pixels
    small, large = python_peak_bytes(name, SMALL, exact), python_peak_bytes(name, LARGE, exact)
    assert large - small < extra_pixels


@pytest.mark.parametrize("name", ["cbst", "cbst_sp"])
def test_refinement_peak_does_not_grow(name):
    """The refinement passes hold [C, WINDOW] counts and one batch, never anything per observed pixel."""
    extra_pixels = (LARGE - SMALL) * SHAPE[0] * SHAPE[2] * SHAPE[3]
    small, large = tensor_peak_bytes(name, SMALL), tensor_peak_bytes(name, LARGE)
    assert small >= SHAPE[1] * F.WINDOW * 8  # the measurement sees the window counts
    assert large - small < extra_pixels
