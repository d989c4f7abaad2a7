"""Endless shuffled batch streams whose position can be saved and restored exactly.

A training phase draws its batches from one :class:`BatchStream` per domain. Each pass over the
data set (an *epoch* of the stream) takes a fresh permutation from the phase's generator; the
stream's state is that permutation, the number of batches already taken from it and the epoch's
sample seed, so a step checkpoint restores the stream to the very next batch without touching the
data (no fast-forward through the loader).

With ``num_workers=0`` samples are augmented in the main process from the process-wide random
generators (saved and restored with every step checkpoint). With workers, each sample's
augmentation draws from generators seeded by ``(epoch seed, position in the epoch)``, so the
augmentations do not depend on the number of workers nor on which worker took the sample, and a
resumed stream repeats them exactly.

Under torchrun (:mod:`selftrain.dist`) ``batch_size`` is the global batch of a step: every rank
draws the same permutations from the same generator and takes its exact contiguous share of each
batch (:func:`selftrain.dist.shard` over the batch's positions), so the ranks' shares of a step
partition the very draws one process makes, and with one process the stream is unchanged.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from . import dist
from .errors import ConfigError


class EpochOrder(Sampler[list[Any]]):
    """The batches of one epoch of a stream: ``batch_size`` indices at a time from ``perm``, from
    batch ``taken`` on (the last partial batch is dropped when the data set holds a full batch);
    of each batch only rank ``rank``'s share out of ``world`` (default: this process's group)."""

    def __init__(self, size: int, batch_size: int, *, rank: int | None = None, world: int | None = None) -> None:
        self.size, self.batch_size = size, batch_size
        self.rank = dist.rank() if rank is None else rank
        self.world = dist.world_size() if world is None else world
        if self.world > 1 and min(size, batch_size) < self.world:
            raise ConfigError(f"a batch of {min(size, batch_size)} samples cannot be shared by {self.world} processes; "
                              f"make every batch size (source_training.batch_size, rounds.batch_source, "
                              f"rounds.batch_target) at least {self.world}, or start fewer processes")
        self.drop_last = size >= batch_size
        self.perm: list[int] | None = None
        self.taken = 0
        self.epoch = 0
        self.seed: int | None = None  # per-sample seeds (workers only)

    @property
    def batches(self) -> int:
        """Full batches per epoch (one partial batch when the data set is smaller than a batch)."""
        return self.size // self.batch_size if self.drop_last else 1

    @property
    def finished(self) -> bool:
        return self.perm is None or self.taken >= self.batches

    def start_epoch(self, generator: torch.Generator, seeded: bool) -> None:
        """Draw the next permutation from ``generator`` in the order torch's ``RandomSampler`` does.

        ``RandomSampler`` draws a second permutation at the end of every pass and keeps none of it
        (``randperm(n)[:0]``); it is drawn here at the same point of the generator's sequence, so a
        stream yields exactly the batches of the ``DataLoader(sampler=RandomSampler(...))`` stream
        of earlier selftrain versions, and their numbers stay reproducible.
        """
        if self.perm is not None and self.drop_last:
            torch.randperm(self.size, generator=generator)
        self.perm = torch.randperm(self.size, generator=generator).tolist()
        if not self.drop_last:  # RandomSampler is exhausted before a partial batch is yielded
            torch.randperm(self.size, generator=generator)
        self.seed = int(torch.randint(0, 2**62, (), generator=generator)) if seeded else None
        self.taken = 0
        self.epoch += 1

    def __iter__(self) -> Iterator[list[Any]]:
        assert self.perm is not None
        for b in range(self.taken, self.batches):
            positions = range(b * self.batch_size, min((b + 1) * self.batch_size, self.size))
            if self.world > 1:
                share = dist.shard(len(positions), self.rank, self.world)
                positions = positions[share.start:share.stop]
            if self.seed is None:
                yield [self.perm[j] for j in positions]
            else:
                yield [(self.perm[j], self.seed + j) for j in positions]

    def __len__(self) -> int:
        return self.batches - self.taken

    def state_dict(self) -> dict[str, Any]:
        perm = None if self.perm is None else torch.tensor(self.perm, dtype=torch.int64)
        return {"perm": perm, "taken": self.taken, "epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["perm"] is not None and len(state["perm"]) != self.size:
            raise ValueError(f"stream state holds a permutation of {len(state['perm'])} samples, the data set "
                             f"{self.size}; the data changed since the checkpoint")
        self.perm = None if state["perm"] is None else state["perm"].tolist()
        self.taken, self.epoch, self.seed = int(state["taken"]), int(state["epoch"]), state["seed"]


class SeededSamples(Dataset):
    """``dataset[(index, seed)]``: seed Python, NumPy and torch with ``seed``, then ``dataset[index]``.

    Used in DataLoader workers only, where these generators belong to the worker."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        return self.dataset[index]


class BatchStream:
    """An endless stream of shuffled batches of ``dataset`` (a new permutation every epoch).

    Args:
        generator: draws the permutations; several streams of a phase may share one.
        num_workers: DataLoader worker processes (persistent over epochs); 0 loads in this process.
        pin_memory: pin batches for faster copies to a GPU.
        rank, world: whose share of each batch of ``batch_size`` this stream yields (default: this
            process's rank in its torchrun group); the state is the same for every rank.
    """

    def __init__(self, dataset: Dataset, batch_size: int, generator: torch.Generator, *, num_workers: int = 0,
                 collate_fn: Callable[[list], Any], pin_memory: bool = False, rank: int | None = None,
                 world: int | None = None) -> None:
        self.generator = generator
        self.order = EpochOrder(len(dataset), batch_size, rank=rank, world=world)
        self.seeded = num_workers > 0
        self.loader = DataLoader(SeededSamples(dataset) if self.seeded else dataset, batch_sampler=self.order,
                                 num_workers=num_workers, collate_fn=collate_fn, pin_memory=pin_memory,
                                 persistent_workers=self.seeded)
        self._batches: Iterator[Any] | None = None

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Any:
        if self._batches is None or self.order.finished:
            self.order.start_epoch(self.generator, self.seeded)
            self._batches = iter(self.loader)
        batch = next(self._batches)
        self.order.taken += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return self.order.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue with the batch after the last one taken.

        A stream restored inside an epoch opens its loader here, before the caller restores the
        process's random state: opening a loader draws from torch's generator, as the interrupted
        run did when the epoch began.
        """
        self.order.load_state_dict(state)
        self._batches = None if self.order.finished else iter(self.loader)
