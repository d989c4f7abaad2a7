"""The README's main job, ``selftrain demo``, end to end on tiny sizes: every run, the summary files, reuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from selftrain.cli import main

REPO = Path(__file__).resolve().parents[2]
DET_TINY = ["source_training.steps=3", "source_training.batch_size=2", "rounds.count=1", "rounds.steps=2",
            "rounds.batch_target=2", "model.options.width=16", "data.source.options.num_images=6",
            "data.target.options.num_images=4", "data.target_val.options.num_images=4", "eval.batch_size=4",
            "pseudo_batch_size=4"]


def demo(out: Path | None, *args: str) -> str:
    where = ["--out", str(out)] if out is not None else []
    result = CliRunner().invoke(main, ["demo", *where, "--recipes", str(REPO / "recipes"), "--quiet", *args],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return result.stdout


@pytest.mark.slow
def test_detection_demo_runs_every_policy_and_reuses_finished_runs(tmp_path, monkeypatch):
    sets = [a for s in DET_TINY for a in ("--set", s)]
    monkeypatch.chdir(tmp_path)
    text = demo(None, "--task", "detection", "--seeds", "0,1", *sets)
    tmp_path = tmp_path / "runs" / "detdemo"  # the detection demo's own default, apart from runs/demo
    summary = json.loads((tmp_path / "summary.json").read_text())
    methods = ["source_only", "det_st", "wst", "wst_weak_mask", "mean_teacher"]
    assert [(r["seed"], r["method"]) for r in summary["rows"]] == [(s, m) for s in (0, 1) for m in methods]
    for row in summary["rows"]:
        online = row["method"] != "source_only"
        assert len(row["map_per_round"]) == (2 if online else 1)
        assert len(row["boxes_per_round"]) == len(row["precision_per_round"]) == int(online)
    assert (tmp_path / "summary.md").read_text().strip() == text.strip()
    assert text.splitlines()[-1].startswith("mean_teacher") and "prec %" in text
    stamp = (tmp_path / "seed_0" / "wst" / "metrics.jsonl").stat().st_mtime_ns
    assert demo(None, "--task", "detection", "--seeds", "0,1", *sets) == text  # finished runs are reused
    assert (tmp_path / "seed_0" / "wst" / "metrics.jsonl").stat().st_mtime_ns == stamp


SEG_TINY = ["source_training.steps=3", "source_training.batch_size=2", "rounds.count=1", "rounds.steps=2",
            "rounds.batch_source=2", "rounds.batch_target=2", "eval.batch_size=4",
            "pseudo_batch_size=4", *(f"data.{s}.options.{k}={v}" for s in ("source", "target", "target_val")
                                     for k, v in (("num_images", 4), ("height", 32), ("width", 64)))]


def test_segmentation_demo_builds_its_prior_and_runs_every_policy(tmp_path):
    text = demo(tmp_path, "--seeds", "0", *(a for s in SEG_TINY for a in ("--set", s)))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["method"] for r in summary["rows"]] == ["source_only", "st", "cbst", "cbst_sp"]
    assert (tmp_path / "seed_0" / "prior_synth_street.npz").exists()
    assert all(len(r["miou_per_round"]) == 1 for r in summary["rows"])  # evaluated after the last round
    assert "rare3" in text and (tmp_path / "summary.md").read_text().strip() == text.strip()
