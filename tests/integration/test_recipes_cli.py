"""Built-in recipes by name: `selftrain recipes list`, `selftrain recipes cp`, `selftrain run NAME`
from a folder without recipes, and what a mistyped name answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from selftrain.catalog import builtin_names, builtin_root, copy_recipe
from selftrain.cli import main
from selftrain.config import load_recipe

REPO = Path(__file__).resolve().parents[2]
TINY = ["--set", "data.source.options.num_images=16", "--set", "data.target.options.num_images=12",
        "--set", "data.target_val.options.num_images=8", "--set", "source_training.steps=3",
        "--set", "rounds.count=1", "--set", "rounds.steps=2", "--set", "model={name: tiny_seg, options: {width: 8}}"]


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_the_built_in_recipes_are_the_checkout_folder():
    assert builtin_root().resolve() == (REPO / "recipes").resolve()
    assert set(builtin_names()) == {p.relative_to(REPO / "recipes").with_suffix("").as_posix()
                                    for p in (REPO / "recipes").rglob("*.yaml")}


def test_recipes_list_shows_every_recipe_with_its_task_and_policy():
    code, out = cli("recipes", "list")
    assert code == 0
    rows = {line.split()[0]: line.split()[1:4] for line in out.splitlines()[1:] if line and not line.startswith("run ")}
    assert set(rows) == set(builtin_names())
    assert rows["det_wst"] == ["detection", "wst", "3"]
    assert rows["synth_source"] == ["segmentation", "(source)", "0"]
    assert rows["gta2city/cbst_deeplabv2"][:2] == ["segmentation", "cbst"]
    assert "Table 1" in next(line for line in out.splitlines() if line.startswith("city2nthu/cbst_rio "))


@pytest.mark.parametrize("name", builtin_names())
def test_a_copied_recipe_is_the_built_in_one_on_its_own(tmp_path, name):
    copied = copy_recipe(name, tmp_path / "copy.yaml")
    assert "extends" not in yaml.safe_load(copied.read_text())
    assert load_recipe(copied) == load_recipe(builtin_root() / f"{name}.yaml")


def test_recipes_cp_into_a_folder_refuses_to_overwrite_and_keeps_the_header(tmp_path):
    code, out = cli("recipes", "cp", "det_wst", str(tmp_path))
    assert code == 0 and out.strip() == f"wrote {tmp_path / 'det_wst.yaml'}"
    text = (tmp_path / "det_wst.yaml").read_text()
    assert text.startswith("# Weak self-training") and "det_wst -> det_defaults" in text
    (tmp_path / "det_wst.yaml").write_text("mine")
    code, out = cli("recipes", "cp", "det_wst", str(tmp_path / "det_wst.yaml"))
    assert code == 2 and "exists; pass --force" in out and (tmp_path / "det_wst.yaml").read_text() == "mine"
    assert cli("recipes", "cp", "det_wst", str(tmp_path / "det_wst.yaml"), "--force")[0] == 0
    assert load_recipe(tmp_path / "det_wst.yaml").name == "det_wst"
    code, out = cli("recipes", "cp", "det_wst", str(tmp_path / "x.txt"))
    assert code == 2 and "not a .yaml file name" in out
    code, out = cli("recipes", "cp", "det_wst", str(tmp_path / "no" / "x.yaml"))
    assert code == 2 and "does not exist" in out


@pytest.mark.parametrize("args, expected", [
    (("run", "synth_cbstt"), "no recipe file synth_cbstt and no built-in recipe of that name (did you mean synth_cbst"),
    (("run", "recipes/synth_cbst.yaml"), "did you mean synth_cbst"),
    (("run", "cbst_deeplabv2"), "did you mean gta2city/cbst_deeplabv2"),
    (("recipes", "cp", "det_wsst", "x.yaml"), "no built-in recipe det_wsst (did you mean det_wst"),
    (("data", "check", "nothing_like_it"), "selftrain recipes list"),
])
def test_a_mistyped_name_is_one_line_with_the_close_ones(tmp_path, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    code, out = cli(*args)
    assert code == 2 and expected in out and len(out.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_run_a_built_in_recipe_by_name_from_an_empty_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out = cli("run", "synth_cbst", "--quiet", *TINY)
    assert code == 0, out
    recs = [json.loads(line) for line in (tmp_path / "runs" / "synth_cbst" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in recs] == [0, 1] and recs[1]["portion"] == 0.2 and "eval" in recs[1]
    assert load_recipe(tmp_path / "runs" / "synth_cbst" / "config.yaml").policy.name == "cbst"


def test_a_file_in_the_folder_wins_over_the_built_in_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    copy_recipe("synth_source", tmp_path / "synth_cbst.yaml")
    code, out = cli("run", "synth_cbst.yaml", "--quiet", *TINY)
    assert code == 0, out
    assert (tmp_path / "runs" / "synth_source" / "metrics.jsonl").is_file() and not (tmp_path / "runs" / "synth_cbst").exists()


@pytest.mark.slow
def test_the_demo_runs_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out = cli("demo", "--quiet", "--out", "demo", *TINY)
    assert code == 0, out
    assert (tmp_path / "demo" / "summary.md").is_file() and "cbst_sp" in out
