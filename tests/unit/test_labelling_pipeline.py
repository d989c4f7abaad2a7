"""The labelling pipeline on logits a trained model rarely gives: beyond float16's range (clipped
in the cache, with a warning, and still labelled) and not finite (one clear error)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from selftrain.adapters.segmentation import SegmentationAdapter
from selftrain.errors import DataError
from selftrain.policies import create_policy
from selftrain.pseudo import label_target
from selftrain.store import PseudoLabelWriter, RoundMeta, open_round

C = 3


class Images(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.full((3, 4, 6), float(i)), "label": torch.zeros(4, 6, dtype=torch.int64),
                "id": f"im{i}"}


class Fixed(torch.nn.Module):
    """Logits [B, C, 4, 6] from a table per image (its first pixel holds the image index)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0, 0, 0].long()]


def run(tmp_path, table: torch.Tensor):
    adapter = SegmentationAdapter(model=Fixed(table), num_classes=C)
    meta = RoundMeta(task="segmentation", round=1, policy="cbst", portion=0.5, num_classes=C,
                     class_names=["a", "b", "c"])
    with PseudoLabelWriter(tmp_path / "r.h5", meta) as writer:
        return label_target(adapter=adapter, policy=create_policy("cbst"), dataset=Images(len(table)), portion=0.5,
                            writer=writer, scratch=tmp_path / "cache.tmp", batch_size=2, device="cpu",
                            ignore_index=255)


def test_logits_beyond_float16_are_clipped_with_a_warning_and_still_labelled(tmp_path, caplog):
    g = torch.Generator().manual_seed(0)
    table = torch.randn(3, C, 4, 6, generator=g) * 2e5  # what a random DeepLab-v2 R101 gives
    with caplog.at_level(logging.WARNING, logger="selftrain.cache"):
        record = run(tmp_path, table)
    assert sum("exceed float16" in r.message for r in caplog.records) == 1
    clipped = table.clamp(-65504, 65504)  # ties at the top pick the first class, as argmax does
    assert sum(record.selected) > 0 and record.predicted == np.bincount(
        clipped.argmax(1).flatten().numpy(), minlength=C).tolist()
    with open_round(tmp_path / "r.h5") as reader:
        kept = reader.labels(0) != 255
        assert (reader.labels(0)[kept] == clipped[0].argmax(0).numpy()[kept]).all()


def test_logits_that_are_not_finite_stop_the_round_with_one_error(tmp_path):
    table = torch.zeros(2, C, 4, 6)
    table[1, :, 0, 0] = float("nan")
    with pytest.raises(DataError, match="not finite.*diverged"):
        run(tmp_path, table)
    assert not (tmp_path / "r.h5").exists() and not (tmp_path / "cache.tmp").exists()
