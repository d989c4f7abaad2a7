"""Labelling in two processes (torchrun, gloo, CPU) gives the round one process gives: the same
thresholds, counts, precision and selection summary on every rank, and a round file equal in every
dataset and attribute; a killed rank stops the other and publishes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

WORKER = Path(__file__).resolve().parents[1] / "dist_label_worker.py"
pytestmark = pytest.mark.slow


def label(kind: str, out: Path, processes: int, **env: str) -> subprocess.CompletedProcess:
    out.mkdir(parents=True)
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "SELFTRAIN_QUIET": "1", **env}
    return subprocess.run([sys.executable, *launcher, str(WORKER), kind, str(out)], capture_output=True, text=True,
                          env=environment, timeout=300)


def file_contents(path: Path) -> tuple[dict, dict]:
    with h5py.File(path, "r") as f:
        attrs = {k: np.asarray(v).tolist() for k, v in f.attrs.items() if k != "created"}
        return attrs, {k: f[k][()] for k in f.keys()}


@pytest.mark.parametrize("kind", ["cbst_sp", "wst"])
def test_two_processes_write_the_round_one_process_writes(tmp_path, kind):
    one, two = tmp_path / "one", tmp_path / "two"
    for out, n in ((one, 1), (two, 2)):
        done = label(kind, out, n)
        assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((one / "record-0.json").read_text())
    assert [json.loads((two / f"record-{r}.json").read_text()) for r in (0, 1)] == [record, record]
    assert sorted(p.name for p in two.iterdir()) == ["record-0.json", "record-1.json", "round_001.h5"]
    attrs_one, data_one = file_contents(one / "round_001.h5")
    attrs_two, data_two = file_contents(two / "round_001.h5")
    assert attrs_one == attrs_two and sorted(data_one) == sorted(data_two)
    for name, values in data_one.items():
        np.testing.assert_array_equal(values, data_two[name], err_msg=name)
    if kind == "cbst_sp":  # exact thresholds from the summed counts, not merely close
        assert len(set(record["thresholds"])) > 1 and sum(record["selected_pixels"]) > 0
    else:
        assert 0 < sum(record["selected_boxes"]) <= record["selection"]["detections"]


def test_a_killed_rank_stops_the_other_and_publishes_no_round(tmp_path):
    start = time.monotonic()
    done = label("cbst_sp", tmp_path / "run", 2, SELFTRAIN_TEST_KILL_RANK="1")
    assert done.returncode != 0 and time.monotonic() - start < 120
    assert "SIGKILL" in done.stderr and "rank      : 1" in done.stderr
    assert not (tmp_path / "run" / "round_001.h5").exists()
    assert not list((tmp_path / "run").glob("record-*.json"))
