"""Recipe strictness: unknown keys, wrong types, overrides, extends chains."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from selftrain.config import RunConfig, load_recipe, to_yaml
from selftrain.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_every_shipped_recipe_validates():
    recipes = sorted((REPO / "recipes").rglob("*.yaml"))  # subfolders too: gta2city/, detection/, ...
    assert len(recipes) >= 66
    for path in recipes:
        assert isinstance(load_recipe(path), RunConfig), path


def test_unknown_key_names_path_and_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"rounds\.cuont.*valid keys under rounds: count"):
        load_recipe(write(tmp_path, "rounds: {cuont: 3}\n"))


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown recipe key polcy"):
        load_recipe(write(tmp_path, "polcy: {name: st}\n"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("rounds: {count: three}\n", r"rounds\.count must be an integer"),
        ("rounds: {count: 2.5}\n", r"rounds\.count must be an integer"),
        ("seed: true\n", r"seed must be an integer"),
        ("augment: {flip: 1}\n", r"augment\.flip must be true or false"),
        ("rounds: {lr_decay: half}\n", r"rounds\.lr_decay is 'half'; choose one of: constant, sqrt2"),
        ("data: {source: [1, 2]}\n", r"data\.source must be a mapping"),
        ("rounds: {portion: {start: 0.5, step: 0.3, max: 1.5}}\n", r"rounds\.portion gives round 3 a portion of 1\.1"),
        ("rounds: {optim: {head_lr_mult: 0}}\n", r"optim\.head_lr_mult must be positive"),
    ],
)
def test_wrong_types_and_values(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(write(tmp_path, text))


def test_partial_sections_keep_their_defaults(tmp_path):
    cfg = load_recipe(write(tmp_path, "rounds: {portion: {start: 0.3}}\n"))
    assert (cfg.rounds.portion.start, cfg.rounds.portion.step, cfg.rounds.portion.max) == (0.3, 0.05, 0.5)
    assert cfg.rounds.source_share.start == 0.03


def test_int_accepted_for_float(tmp_path):
    assert load_recipe(write(tmp_path, "rounds: {optim: {lr: 1}}\n")).rounds.optim.lr == 1.0


def test_overrides_apply_and_validate(tmp_path):
    path = write(tmp_path, "name: x\n")
    cfg = load_recipe(path, ["rounds.count=5", "policy.name=st", "rounds.portion.start=0.3"])
    assert (cfg.rounds.count, cfg.policy.name, cfg.rounds.portion.start) == (5, "st", 0.3)
    with pytest.raises(ConfigError, match="rounds.cnt"):
        load_recipe(path, ["rounds.cnt=1"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_recipe(path, ["rounds.count"])


def test_extends_merges_and_renamed_entries_replace(tmp_path):
    (tmp_path / "base.yaml").write_text("model: {name: smp_unet, options: {encoder: resnet18}}\nseed: 3\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\nmodel: {name: tiny_seg, options: {width: 4}}\n")
    cfg = load_recipe(child)
    assert cfg.seed == 3 and cfg.model.options == {"width": 4}


def test_extends_cycle_and_missing_file(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_recipe(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_resolved_recipe_round_trips(tmp_path):
    cfg = load_recipe(REPO / "recipes" / "synth_cbst_sp.yaml")
    again = load_recipe(write(tmp_path, to_yaml(cfg)))
    assert again == cfg
    assert yaml.safe_load(to_yaml(cfg))["policy"]["name"] == "cbst_sp"


def test_schedule_ramps():
    cfg = RunConfig()
    assert [cfg.rounds.portion.at(r) for r in (1, 2, 7, 8)] == pytest.approx([0.2, 0.25, 0.5, 0.5])
    assert [cfg.rounds.source_share.at(r) for r in (1, 2, 13, 20)] == pytest.approx([0.03, 0.0325, 0.06, 0.06])


@pytest.mark.parametrize("text, message", [
    ("losses: [{name: dann, start: 1.5}]\n", r"^losses\[0\]\.start must be in \[0, 1\], got 1\.5; give a number in \[0, 1\]"),
    ("losses: [{name: dann, start: -0.1}]\n", r"^losses\[0\]\.start must be in \[0, 1\]"),
    ("losses: [{name: dann, options: {optim: {schedule: cosine}}}]\n",
     r"^losses\[0\]\.options\.optim\.schedule is 'cosine'; choose one of: constant, follow"),
    ("source_training: {lr_milestones: [50000]}\n",
     r"^source_training\.lr_milestones needs lr_schedule: step \(it is poly\)"),
    ("source_training: {lr_schedule: step, lr_milestones: [500, 200]}\n",
     r"^source_training\.lr_milestones must be increasing steps, got \[500, 200\]"),
    ("source_training: {lr_schedule: step, lr_milestones: [0]}\n", r"^source_training\.lr_milestones\[0\] must be >= 1"),
    ("source_training: {lr_gamma: 0}\n", r"^source_training\.lr_gamma must be in \(0, 1\]"),
])
def test_loss_term_and_milestone_keys_fail_in_one_line(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_recipe(write(tmp_path, text))
    assert "\n" not in str(err.value)


def test_loss_term_and_milestone_keys_default_to_the_earlier_behaviour(tmp_path):
    cfg = load_recipe(write(tmp_path, "losses: [{name: dann}]\n"))
    assert cfg.losses[0].start == 0.0 and cfg.source_training.lr_milestones is None
    assert cfg.source_training.lr_gamma == 0.1
    cfg = load_recipe(write(tmp_path, "source_training: {lr_schedule: step, lr_milestones: [50000], lr_gamma: 0.1}\n"
                                      "losses: [{name: dann, start: 0.4286, options: {optim: {schedule: follow}}}]\n"))
    assert cfg.source_training.lr_milestones == [50000] and cfg.losses[0].start == 0.4286
    assert cfg.losses[0].options["optim"] == {"schedule": "follow"}
