"""The paper's recipe grid: every recipe validates, names what it needs, and the main one runs end
to end on tiny fixtures in the official on-disk layouts (DeepLab-v2 ResNet-101 on CPU)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from layouts import write_cityscapes, write_gta5
from selftrain.cli import main
from selftrain.config import load_recipe

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if p.name not in ("MANIFEST.yaml",))


def run_cli(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_recipe_validates(recipe):
    cfg = load_recipe(recipe)
    assert cfg.name


def test_the_grid_is_complete():
    names = {str(p.relative_to(REPO / "recipes")) for p in RECIPES}
    for model in ("fcn8s_vgg16", "resnet38", "deeplabv2"):
        assert {f"gta2city/{pol}_{model}.yaml" for pol in ("st", "cbst", "cbst_sp")} <= names
    for model in ("fcn8s_vgg16", "resnet38"):
        assert {f"synthia2city/{pol}_{model}.yaml" for pol in ("st", "cbst")} <= names
    for city in ("rome", "rio", "tokyo", "taipei"):
        assert {f"city2nthu/{pol}_{city}.yaml" for pol in ("st", "cbst")} <= names
    assert {f"gta2bdd/{pol}_resnet38.yaml" for pol in ("st", "st_sp", "cbst", "cbst_sp")} <= names
    readme = (REPO / "recipes" / "README.md").read_text()
    partials = {"base", "paper", "deeplabv2", "fcn8s_vgg16", "resnet38", "defaults", "det_defaults"}
    missing = [name for name in names if Path(name).stem not in partials and f"`{name}`" not in readme]
    assert not missing


def test_paper_protocol_values():
    cfg = load_recipe(REPO / "recipes" / "gta2city" / "cbst_resnet38.yaml")
    assert (cfg.rounds.count, cfg.rounds.portion.start, cfg.rounds.portion.step, cfg.rounds.portion.max) == (3, 0.2, 0.05, 0.5)
    assert cfg.rounds.target_epochs == 2 and cfg.augment.crop == [500, 500] and cfg.augment.scale == [0.7, 1.3]
    assert cfg.rounds.optim.name == "sgd" and cfg.rounds.optim.lr == 1e-4 and cfg.rounds.batch_target == 2
    assert cfg.policy.mining.enabled and cfg.policy.mining.rare_share == 0.001
    fcn = load_recipe(REPO / "recipes" / "gta2city" / "st_fcn8s_vgg16.yaml")
    assert fcn.rounds.optim.lr == 1e-6 and fcn.rounds.batch_target == 1 and fcn.model.name == "fcn8s_vgg16"
    assert load_recipe(REPO / "recipes" / "city2nthu" / "cbst_tokyo.yaml").data.target.options == {"city": "Tokyo"}


def test_missing_data_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli("run", REPO / "recipes" / "cbst_gta2city.yaml", "--out", tmp_path / "run")
    assert code == 2 and err.strip() == ("error: data path data/gta5 does not exist; put the gta5 data set there "
                                         "or fix its root in the recipe")


@pytest.mark.slow
def test_cbst_gta2city_runs_end_to_end_on_official_layouts(tmp_path, monkeypatch):
    write_gta5(tmp_path / "data" / "gta5", n=4, size=(48, 64), mismatched=1)
    write_cityscapes(tmp_path / "data" / "cityscapes", splits={"train": 3, "val": 2}, size=(48, 64), foggy=False)
    import torchvision

    (tmp_path / "weights").mkdir()
    torch.save(torchvision.models.resnet101().state_dict(), tmp_path / "weights" / "resnet101_imagenet.pth")
    monkeypatch.chdir(tmp_path)
    small = ["device=cpu", "source_training.steps=2", "source_training.batch_size=2", "rounds.count=1",
             "rounds.steps=1", "rounds.batch_source=1", "rounds.batch_target=1", "augment.crop=[40, 40]",
             "data.num_workers=0", "model.options.freeze_bn=false"]
    args = [a for s in small for a in ("--set", s)]
    code, out, err = run_cli("run", REPO / "recipes" / "cbst_gta2city.yaml", "--out", tmp_path / "run", "--quiet", *args)
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1] and len(records[1]["eval"]["iou"]) == 19
    assert (tmp_path / "run" / "pseudo" / "round_001.h5").is_file()
    assert os.path.getsize(tmp_path / "run" / "checkpoints" / "round_001.pt") > 150e6  # the real DeepLab-v2 R101
