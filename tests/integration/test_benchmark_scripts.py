"""benchmarks/pseudo_box_ranking.py on a tiny finished detection run: what it counts is consistent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from selftrain.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_pseudo_box_ranking_reports_thresholds_and_top_k(det_tiny_recipe, tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", str(det_tiny_recipe), "--out", str(run), "--quiet", "--set",
                                       "rounds.count=0", "--set", "model.options.score_thresh=0.0"])
    assert result.exit_code == 0, result.stderr
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "pseudo_box_ranking.py"), str(run),
                          "--images", "6", "--delta", "0.5", "0.7"], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
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
    bad = subprocess.run([sys.executable, str(REPO / "benchmarks" / "pseudo_box_ranking.py"), str(run), "--round", "4"],
                         check=False, capture_output=True, text=True)
    assert bad.returncode == 2 and "round_004.pt does not exist" in bad.stderr
