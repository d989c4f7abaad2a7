"""benchmarks/pseudo_box_ranking.py on a tiny finished detection run: what it counts is consistent."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from selftrain.cli import main

REPO = Path(__file__).resolve().parents[2]
RANKING = REPO / "benchmarks" / "pseudo_box_ranking.py"


def run_script(monkeypatch, path: Path, *args: str) -> None:
    """``python path args`` in this process: a fresh interpreter spends seconds importing torch."""
    monkeypatch.setattr(sys, "argv", [str(path), *args])
    with torch.enable_grad():  # the script turns gradients off; this restores them for the other tests
        runpy.run_path(str(path), run_name="__main__")


def test_pseudo_box_ranking_reports_thresholds_and_top_k(det_tiny_recipe, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", str(det_tiny_recipe), "--out", str(run), "--quiet", "--set",
                                       "rounds.count=0", "--set", "model.options.score_thresh=0.0"])
    assert result.exit_code == 0, result.stderr
    capsys.readouterr()
    run_script(monkeypatch, RANKING, str(run), "--images", "6", "--delta", "0.5", "0.7")
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["images"] == 6 and report["detections"] >= 25 and 0 <= report["correct"] <= report["detections"]
    readings = [f"srrs_{r}(delta={d})" for r in ("per_class", "any_class") for d in (0.5, 0.7)]
    for key in ("score>=0.9", *(f"{r}>=0.8" for r in readings)):
        assert 0 <= report[key]["kept"] <= report["detections"]
    for reading in readings:
        q = report[f"{reading}>=0.8"]["quantiles"]
        assert 0.0 <= q["median"] <= q["p90"] <= q["p99"] <= q["max"] <= 1.0
        assert report[f"{reading}>=0.8"]["support"]["median"] >= 1  # every detection supports itself
    top = report["top_k"]["25"]
    assert set(top) == {"score", *readings} and all(0 <= v <= 1 for v in top.values())
    with pytest.raises(SystemExit) as bad:
        run_script(monkeypatch, RANKING, str(run), "--round", "4")
    assert bad.value.code == 2 and "round_004.pt does not exist" in capsys.readouterr().err
    assert torch.is_grad_enabled()


THRESHOLDS = REPO / "benchmarks" / "thresholds.py"
LOGIT_CACHE = REPO / "benchmarks" / "logit_cache.py"


@pytest.mark.slow
@pytest.mark.parametrize("prior", [False, True])
def test_threshold_benchmark_finds_identical_thresholds_in_less_memory(monkeypatch, capsys, prior):
    run_script(monkeypatch, THRESHOLDS, "--maps", "2", "12", "--height", "32", "--width", "64",
               *(["--prior"] if prior else []))
    reports = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["maps"] for r in reports] == [2, 12]
    for r in reports:
        assert r["identical"] is True
        assert r["seconds"]["ours"] > 0 and r["seconds"]["baseline"] > 0
        assert r["seconds"]["ratio"] == pytest.approx(r["seconds"]["ours"] / r["seconds"]["baseline"], rel=1e-2)
        assert r["peak_mb"]["ours"] >= 0 and r["peak_mb"]["baseline"] >= 0


def test_logit_cache_benchmark_measures_the_stride(monkeypatch, capsys):
    run_script(monkeypatch, LOGIT_CACHE, "--height", "33", "--width", "47", "--images", "2",
               "--models", "tiny_seg", "deeplabv2")
    tiny, deeplab = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert tiny["native"] == [19, 17, 24] and deeplab["native"] == [19, 5, 6]
    assert tiny["bytes_per_image"] == {"stride": 19 * 17 * 24 * 2, "full": 19 * 33 * 47 * 2,
                                       "ratio": round(47 * 33 / (17 * 24), 2)}
    assert deeplab["bytes_per_image"]["stride"] == 19 * 5 * 6 * 2
    assert deeplab["cityscapes"]["native"] == [19, 128, 256]  # DeepLab-v2 at stride 8 on 1024 x 2048
    assert deeplab["cityscapes"]["stride_mb"] == round(19 * 128 * 256 * 2 / 1e6, 3)
    assert deeplab["cityscapes"]["ratio"] == 64.0
