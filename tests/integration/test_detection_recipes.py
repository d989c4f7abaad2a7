"""The detection recipes of the WST paper and the Faster R-CNN settings run a few steps on tiny
fixtures in each data set's real layout; without the data, one line names the missing path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from det_layouts import write_cityscapes_boxes, write_clipart, write_sim10k, write_voc
from selftrain.cli import main

REPO = Path(__file__).resolve().parents[2]
DETECTION = REPO / "recipes" / "detection"
FEW_STEPS = ["device=cpu", "source_training.steps=2", "source_training.batch_size=2", "rounds.count=1",
             "rounds.steps=2", "rounds.batch_target=2", "eval.batch_size=2", "pseudo_batch_size=2",
             "data.num_workers=0", "model.options.backbone_weights=null"]


def run_cli(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def write_fixtures(root: Path) -> None:
    for year in (2007, 2012):
        write_voc(root / "data" / "VOCdevkit", year=year, split="trainval")
    write_clipart(root / "data" / "clipart", split="all")
    for name in ("watercolor", "comic"):
        write_clipart(root / "data" / name, split="train")
        write_clipart(root / "data" / name, split="test")
    write_sim10k(root / "data" / "sim10k", split="trainval")
    write_cityscapes_boxes(root / "data" / "cityscapes", split="train")
    write_cityscapes_boxes(root / "data" / "cityscapes", split="val")


@pytest.mark.parametrize("recipe", ["wst_voc2clipart", "wst_voc2watercolor", "wst_voc2comic"])
def test_missing_data_is_named(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli("run", DETECTION / f"{recipe}.yaml", "--out", tmp_path / "run")
    assert code == 2 and "data/VOCdevkit does not exist" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("recipe, extra", [
    ("wst_voc2clipart", []), ("wst_voc2watercolor", []), ("wst_voc2comic", []),
    ("mt_city2foggy", ["model.options.min_size=96", "model.options.max_size=192"]),
    ("mt_sim10k2city", ["model.options.min_size=96", "model.options.max_size=192"]),
])
def test_recipe_runs_a_few_steps_on_fixtures(recipe, extra, tmp_path, monkeypatch):
    write_fixtures(tmp_path)
    monkeypatch.chdir(tmp_path)
    args = [a for s in FEW_STEPS + extra for a in ("--set", s)]
    code, _, err = run_cli("run", DETECTION / f"{recipe}.yaml", "--out", tmp_path / "run", "--quiet", *args)
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1] and "map" in records[1]["eval"]
    assert (tmp_path / "run" / "pseudo" / "round_001.h5").is_file()
