"""One process is the case N = 1: the helpers of ``selftrain.dist`` without a process group."""

from __future__ import annotations

import pytest
import torch

from selftrain import dist


@pytest.mark.parametrize("n", [0, 1, 2, 7, 10, 2975])
@pytest.mark.parametrize("w", [1, 2, 3, 8])
def test_shards_cover_every_index_once_in_rank_order(n, w):
    shards = [dist.shard(n, r, w) for r in range(w)]
    assert [i for s in shards for i in s] == list(range(n))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_single_process_helpers_are_identities():
    t = torch.arange(4)
    assert dist.world_size() == 1 and dist.rank() == 0 and dist.is_main()
    assert dist.all_reduce_sum(t) is t and t.tolist() == [0, 1, 2, 3]
    assert dist.all_gather_objects({"a": 1}) == [{"a": 1}]
    assert dist.broadcast_object(3) == 3
    assert dist.any_rank(True) and not dist.any_rank(False)
    assert dist.shard(10) == range(10)


def test_launched_reads_torchruns_world_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert dist.launched()
    monkeypatch.setenv("WORLD_SIZE", "x")
    assert not dist.launched()
    monkeypatch.delenv("WORLD_SIZE")
    assert not dist.launched() and dist.local_device("cuda") == "cuda"
