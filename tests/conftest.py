"""Shared fixtures: a tiny recipe on the synthetic benchmark that runs in seconds."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("SELFTRAIN_QUIET", "1")

TINY = """\
extends: {defaults}
name: tiny
data:
  source: {{options: {{num_images: 16, height: 32, width: 64}}}}
  target: {{options: {{num_images: 12, height: 32, width: 64}}}}
  target_val: {{options: {{num_images: 8, height: 32, width: 64}}}}
model: {{name: tiny_seg, options: {{width: 8}}}}
source_training: {{steps: 6, batch_size: 4}}
rounds: {{count: 2, steps: 3, batch_source: 2, batch_target: 2}}
eval: {{batch_size: 4}}
pseudo_batch_size: 5
"""


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.format(defaults=REPO / "recipes" / "defaults.yaml"))
    return path


DET_TINY = """\
extends: {defaults}
name: det_tiny
data:
  source: {{options: {{num_images: 12}}}}
  target: {{options: {{num_images: 10}}}}
  target_val: {{options: {{num_images: 6}}}}
model: {{name: tiny_ssd, options: {{width: 16}}}}
source_training: {{steps: 6, batch_size: 4}}
rounds: {{count: 2, steps: 3, batch_source: 2, batch_target: 2}}
eval: {{batch_size: 6}}
pseudo_batch_size: 5
"""


@pytest.fixture
def det_tiny_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "det_tiny.yaml"
    path.write_text(DET_TINY.format(defaults=REPO / "recipes" / "det_defaults.yaml"))
    return path


def copy_interrupted(full: Path, part: Path, last_round: int) -> None:
    """``part`` = run ``full`` as if it had stopped after ``last_round``: later checkpoints, pseudo-label
    files and metrics lines removed (a resumed ``part`` must end like ``full``)."""
    shutil.copytree(full, part)
    for ckpt in (part / "checkpoints").glob("round_*.pt"):
        if int(ckpt.stem.split("_")[1]) > last_round:
            ckpt.unlink()
    for h5 in (part / "pseudo").glob("round_*.h5"):
        if int(h5.stem.split("_")[1]) > last_round:
            h5.unlink()
    lines = (part / "metrics.jsonl").read_text().splitlines()
    (part / "metrics.jsonl").write_text("\n".join(lines[: last_round + 1]) + "\n")


@pytest.fixture
def interrupted():
    return copy_interrupted
