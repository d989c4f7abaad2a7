"""Batch streams: the same batches as a DataLoader over torch's RandomSampler, a saved position that
continues exactly, and worker-independent augmentation."""

from __future__ import annotations

import random

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from selftrain.checkpoint import rng_state, set_rng_state
from selftrain.streams import BatchStream


class Noisy(Dataset):
    """Sample i: its index and a draw from torch's and Python's generators (an augmentation)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"id": i, "noise": float(torch.rand(())), "py": random.random()}


def collate(samples):
    return [(s["id"], s["noise"], s["py"]) for s in samples]


def reference(dataset, batch_size, generator):
    """The stream selftrain used before: an endless DataLoader over RandomSampler(generator)."""
    loader = DataLoader(dataset, batch_size=batch_size, sampler=RandomSampler(dataset, generator=generator),
                        drop_last=len(dataset) >= batch_size, collate_fn=collate)
    while True:
        yield from loader


def draw(streams, pattern):
    return [next(streams[name]) for name in pattern]


@pytest.mark.parametrize("sizes", [((10, 3), (7, 2)), ((12, 4), (3, 5)), ((5, 5), (9, 4))])
def test_two_streams_on_one_generator_yield_the_reference_batches(sizes):
    (n_a, b_a), (n_b, b_b) = sizes
    pattern = ["a", "b", "a", "a", "b"] * 6
    torch.manual_seed(0)
    random.seed(0)
    g = torch.Generator().manual_seed(3)
    ref = draw({"a": reference(Noisy(n_a), b_a, g), "b": reference(Noisy(n_b), b_b, g)}, pattern)
    after_ref = (torch.rand(()), g.get_state())
    torch.manual_seed(0)
    random.seed(0)
    g = torch.Generator().manual_seed(3)
    new = draw({"a": BatchStream(Noisy(n_a), b_a, g, collate_fn=collate),
                "b": BatchStream(Noisy(n_b), b_b, g, collate_fn=collate)}, pattern)
    assert new == ref
    assert torch.equal(after_ref[0], torch.rand(())) and torch.equal(after_ref[1], g.get_state())


@pytest.mark.parametrize("cut", [1, 3, 4, 5, 9])
def test_a_restored_stream_continues_with_the_next_batch(cut):
    pattern = ["a", "b"] * 8

    def fresh():
        g = torch.Generator().manual_seed(7)
        return g, {"a": BatchStream(Noisy(9), 2, g, collate_fn=collate), "b": BatchStream(Noisy(4), 3, g, collate_fn=collate)}

    torch.manual_seed(1)
    random.seed(1)
    _, streams = fresh()
    whole = draw(streams, pattern)

    torch.manual_seed(1)
    random.seed(1)
    g, streams = fresh()
    first = draw(streams, pattern[:cut])
    saved = {k: s.state_dict() for k, s in streams.items()}, g.get_state(), rng_state()
    torch.manual_seed(99)  # a new process: everything else is different
    random.seed(99)
    g, streams = fresh()
    for k, s in streams.items():
        s.load_state_dict(saved[0][k])
    g.set_state(saved[1])
    set_rng_state(saved[2])
    assert first + draw(streams, pattern[cut:]) == whole


def test_a_state_of_another_data_set_size_is_refused():
    g = torch.Generator().manual_seed(0)
    s = BatchStream(Noisy(6), 2, g, collate_fn=collate)
    next(s)
    other = BatchStream(Noisy(5), 2, g, collate_fn=collate)
    with pytest.raises(ValueError, match="permutation of 6 samples, the data set 5"):
        other.load_state_dict(s.state_dict())


@pytest.mark.slow
def test_worker_augmentations_depend_on_the_position_not_the_worker_and_resume_exactly():
    def run(workers, cut=None):
        g = torch.Generator().manual_seed(5)
        s = BatchStream(Noisy(7), 2, g, num_workers=workers, collate_fn=collate)
        out = [next(s) for _ in range(cut or 8)]
        if cut is not None:
            state, gen = s.state_dict(), g.get_state()
            g = torch.Generator()
            s = BatchStream(Noisy(7), 2, g, num_workers=workers, collate_fn=collate)
            s.load_state_dict(state)
            g.set_state(gen)
            out += [next(s) for _ in range(8 - cut)]
        return out

    one, two = run(1), run(2)
    assert one == two
    assert len({b[0][1] for b in one}) == len(one)  # the samples really were augmented differently
    assert run(2, cut=4) == two and run(2, cut=3) == two
