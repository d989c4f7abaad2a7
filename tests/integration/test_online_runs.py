"""Online policies end to end on tiny models: detection (det_st, wst, mean teacher) and the
segmentation mean teacher; stored labels, metrics, resume equivalence, recipe errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from selftrain.cli import main
from selftrain.store import open_round


def run_cli(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("policy", ["det_st", "wst", "mean_teacher"])
def test_detection_policies_run_and_store_boxes(det_tiny_recipe, tmp_path, policy):
    out = tmp_path / policy
    code, text, err = run_cli("run", det_tiny_recipe, "--set", f"policy.name={policy}", "--set",
                              "policy.options={threshold: 0.0}" if policy != "det_st" else "policy.options={}",
                              "--out", out, "--quiet")
    assert code == 0, err
    recs = records(out)
    assert [r["round"] for r in recs] == [0, 1, 2] and all("map" in r["eval"] for r in recs)
    assert len(recs[0]["eval"]["ap"]) == 6 and "tgt/cls" in recs[1]["losses"]
    with open_round(out / "pseudo" / "round_002.h5") as reader:
        assert reader.task == "detection" and len(reader) == 10 and reader.meta["policy"] == policy
        found = [reader.boxes(i) for i in range(len(reader))]
        total = sum(len(f["labels"]) for f in found)
        assert recs[2]["pseudo"]["selected_pixels"] == np.bincount(
            np.concatenate([f["labels"] for f in found]).astype(int) - 1, minlength=6).tolist()
        if policy == "wst":  # threshold 0: every final detection is kept, with its SRRS
            assert total > 0 and all(np.isfinite(f["srrs"]).all() for f in found)
        else:
            assert all(np.isnan(f["srrs"]).all() for f in found)
    ckpt = torch.load(out / "checkpoints" / "round_002.pt", weights_only=False)
    assert (ckpt["teacher"] is not None and "model" in ckpt["teacher"]) == (policy == "mean_teacher")


def test_online_resume_equals_an_uninterrupted_run(det_tiny_recipe, tmp_path):
    args = ["--set", "policy.name=mean_teacher", "--set", "policy.options={threshold: 0.0, decay: 0.9}", "--quiet"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_cli("run", det_tiny_recipe, "--out", full, *args)[0] == 0
    assert run_cli("run", det_tiny_recipe, "--out", part, "--set", "rounds.count=1", *args)[0] == 0
    # the interrupted run's recipe said 1 round; continuing with 2 is a new recipe, so copy round 1 over
    shutil.rmtree(part)
    shutil.copytree(full, part)
    for p in [part / "checkpoints" / "round_002.pt", part / "pseudo" / "round_002.h5"]:
        p.unlink()
    lines = (part / "metrics.jsonl").read_text().splitlines()
    (part / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    code, _, err = run_cli("run", det_tiny_recipe, "--out", part, "--resume", *args)
    assert code == 0, err
    assert records(part)[2]["eval"]["map"] == pytest.approx(records(full)[2]["eval"]["map"], abs=1e-9)
    a = torch.load(full / "checkpoints" / "round_002.pt", weights_only=False)
    b = torch.load(part / "checkpoints" / "round_002.pt", weights_only=False)
    for key in a["teacher"]["model"]:
        assert torch.equal(a["teacher"]["model"][key], b["teacher"]["model"][key]), key


def test_segmentation_mean_teacher(tiny_recipe, tmp_path):
    out = tmp_path / "mt"
    code, _, err = run_cli("run", tiny_recipe, "--set", "policy.name=mean_teacher", "--set",
                           "policy.options={threshold: 0.5}", "--out", out, "--quiet")
    assert code == 0, err
    recs = records(out)
    assert recs[2]["phase"] == "online" and math.isfinite(recs[2]["eval"]["miou"]) and "tgt/ce" in recs[1]["losses"]
    with open_round(out / "pseudo" / "round_001.h5") as reader:
        labels = np.stack([reader.labels(i) for i in range(len(reader))])
        conf = np.stack([reader.confidence(i) for i in range(len(reader))])
    assert ((labels == 255) == (conf < 0.5)).mean() > 0.99  # float16 rounding at the threshold aside


@pytest.mark.parametrize("setting, message", [
    (["policy.name=cbst"], "does not work for detection"),
    (["policy.name=wst", "policy.options={bogus: 1}"], "policy.options do not fit"),
    (["model.name=tiny_seg", "model.options={}"], "segmentation model"),
])
def test_detection_recipe_errors(det_tiny_recipe, tmp_path, setting, message):
    args = [a for s in setting for a in ("--set", s)]
    code, _, err = run_cli("run", det_tiny_recipe, *args, "--out", tmp_path / "x")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
