"""Per-rank batch streams under torchrun: with W = 1 the draws are today's, and the W ranks' shares of
every step partition the global batch one process draws (same permutations, same generator)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from selftrain.errors import ConfigError
from selftrain.streams import BatchStream, EpochOrder


class Ids(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def ids(samples):
    return list(samples)


def batches(n, batch, steps, *, rank=None, world=None, num_workers=0, seed=5):
    stream = BatchStream(Ids(n), batch, torch.Generator().manual_seed(seed), collate_fn=ids, rank=rank,
                         world=world, num_workers=num_workers)
    return [next(stream) for _ in range(steps)], stream


def reference(n, batch, steps, seed=5):
    """The draws of one process before streams had shares: a DataLoader over RandomSampler."""
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(Ids(n), batch_size=batch, sampler=RandomSampler(Ids(n), generator=g), drop_last=n >= batch,
                        collate_fn=ids)
    out = []
    while len(out) < steps:
        out += list(loader)
    return out[:steps]


@pytest.mark.parametrize("n,batch", [(10, 4), (12, 4), (3, 5), (9, 9)])
def test_one_rank_of_one_is_the_stream_of_one_process(n, batch):
    default, s0 = batches(n, batch, 13)
    explicit, s1 = batches(n, batch, 13, rank=0, world=1)
    assert default == explicit == reference(n, batch, 13)
    assert torch.equal(s0.generator.get_state(), s1.generator.get_state())
    assert s0.state_dict()["taken"] == s1.state_dict()["taken"]


@pytest.mark.parametrize("n,batch,world", [(10, 4, 2), (12, 5, 2), (11, 3, 3), (7, 8, 2), (20, 8, 4)])
def test_the_ranks_shares_partition_every_global_batch_in_rank_order(n, batch, world):
    steps = 17  # several epochs, and with n < batch the one partial batch per epoch
    whole, single = batches(n, batch, steps, rank=0, world=1)
    shares = [batches(n, batch, steps, rank=r, world=world) for r in range(world)]
    for step in range(steps):
        parts = [shares[r][0][step] for r in range(world)]
        assert [i for p in parts for i in p] == whole[step]  # contiguous shares, rank order, no padding
        assert max(map(len, parts)) - min(map(len, parts)) <= 1 and min(map(len, parts)) >= 1
    for _, stream in shares:  # every rank's stream state (saved by rank 0) is the one-process state
        assert torch.equal(stream.state_dict()["perm"], single.state_dict()["perm"])
        assert stream.state_dict()["taken"] == single.state_dict()["taken"]
        assert torch.equal(stream.generator.get_state(), single.generator.get_state())


def test_workers_seed_each_sample_as_one_process_does():
    whole, _ = batches(10, 4, 3, rank=0, world=1, num_workers=0)
    order = EpochOrder(10, 4, rank=1, world=2)
    order.start_epoch(torch.Generator().manual_seed(5), seeded=True)
    full = EpochOrder(10, 4, rank=0, world=1)
    full.start_epoch(torch.Generator().manual_seed(5), seeded=True)
    first_share, first_full = next(iter(order)), next(iter(full))
    assert first_share == first_full[2:]  # (index, per-sample seed) pairs: the same seeds as W = 1
    assert [i for i, _ in first_full] == whole[0]


def test_a_batch_smaller_than_the_world_is_a_config_error():
    with pytest.raises(ConfigError, match="at least 4"):
        EpochOrder(100, 3, rank=0, world=4)
    with pytest.raises(ConfigError, match="at least 2"):
        EpochOrder(1, 8, rank=0, world=2)
