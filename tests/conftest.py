"""Shared fixtures: a tiny recipe on the synthetic benchmark that runs in seconds."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("SELFTRAIN_QUIET", "1")
# Idle OpenMP threads sleep instead of spinning (set before torch loads; subprocesses inherit it). The
# thread count and so every number stay the same, but on a small machine shared with other work the
# spinning threads took the cores from the ones with work: the fast tier ran 2-4x slower under load.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): on a
    shared 2-core machine OpenMP's spinning threads made the detector tests 5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def restore_logging():
    """The CLI configures the ``selftrain`` logger; leave it as it was for the tests that follow
    (modules whose commands configure it use this for every test: ``pytest.mark.usefixtures``)."""
    logger = logging.getLogger("selftrain")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


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


def last_map(run: Path) -> float:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["eval"]["map"]


@pytest.fixture
def resumed(tmp_path):
    """``resumed(recipe, args) -> (full, part)``: ``full`` runs the recipe whole; ``part`` is a copy cut
    after round 1 and continued with ``--resume``. Both exit 0 and end with the same mAP."""
    from click.testing import CliRunner

    from selftrain.cli import main

    def run(recipe: Path, args: list[str]) -> tuple[Path, Path]:
        full, part = tmp_path / "full", tmp_path / "part"
        for out, extra in ((full, []), (part, ["--resume"])):
            if out is part:
                copy_interrupted(full, part, last_round=1)
            result = CliRunner().invoke(main, ["run", str(recipe), "--out", str(out), *extra, *args],
                                        catch_exceptions=False)
            assert result.exit_code == 0, result.stderr
        assert last_map(part) == pytest.approx(last_map(full), abs=1e-9)
        return full, part

    return run
