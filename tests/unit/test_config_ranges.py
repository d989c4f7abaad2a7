"""Recipe ranges: every numeric key refuses values that make no sense, in one line that names the
key path, the value and the valid range; the number forms a user types are read as numbers."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from selftrain.config import Bound, RunConfig, load_recipe
from selftrain.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SEG = REPO / "recipes" / "defaults.yaml"
DET = REPO / "recipes" / "det_defaults.yaml"


def case(path: str, value: str, *extra: str, recipe: Path = SEG):
    """A bad ``value`` for key ``path`` (set with ``--set``), after the ``extra`` overrides."""
    return pytest.param(path, [*extra, f"{path}={value}"], recipe, id=f"{path}={value}")


def bad_loss(field: str, value: str):
    """A loss-term key; ``output_space`` takes an ``optim`` option (its discriminator's)."""
    options = f"{{optim: {{{field}: {value}}}}}" if field != "weight" else "{}"
    weight = value if field == "weight" else "1"
    path = "losses[0].weight" if field == "weight" else f"losses[0].options.optim.{field}"
    return pytest.param(path, [f"losses=[{{name: output_space, weight: {weight}, options: {options}}}]"], SEG,
                        id=f"{path}={value}")


BAD = [
    # batch sizes
    case("source_training.batch_size", "0"), case("source_training.batch_size", "-1"),
    case("eval.batch_size", "0"), case("eval.batch_size", "-4"),
    case("pseudo_batch_size", "0"), case("pseudo_batch_size", "-2"),
    case("rounds.batch_target", "0"), case("rounds.batch_target", "-1"), case("rounds.batch_source", "-1"),
    # learning rates, momentum, weight decay, head multiplier, clipping, accumulation
    case("source_training.optim.lr", "-0.1"), case("source_training.optim.lr", "0"),
    case("source_training.optim.lr", "nan"), case("source_training.optim.lr", ".nan"),
    case("source_training.optim.lr", "inf"), case("source_training.optim.lr", "-.inf"),
    case("source_training.optim.lr", "1e400"), case("rounds.optim.lr", "-1e-3"), case("rounds.optim.lr", "0.0"),
    case("rounds.optim.lr", ".inf"), case("rounds.optim.lr", "NaN"), case("rounds.optim.lr", "-2.5E-4"),
    case("source_training.optim.momentum", "-0.1"), case("source_training.optim.momentum", "1"),
    case("rounds.optim.momentum", "1.5"), case("rounds.optim.momentum", "-1e-9"),
    case("source_training.optim.weight_decay", "-5e-4"), case("rounds.optim.weight_decay", "nan"),
    case("rounds.optim.weight_decay", "inf"), case("rounds.optim.head_lr_mult", "0"),
    case("rounds.optim.head_lr_mult", "-10"), case("source_training.optim.clip_grad_norm", "0"),
    case("source_training.optim.clip_grad_norm", "inf"), case("rounds.optim.accumulate", "0"),
    case("rounds.optim.accumulate", "-3"),
    # data
    case("data.num_workers", "-1"), case("data.ignore_index", "-1"), case("data.ignore_index", "256"),
    case("data.ignore_index", "3"), case("data.ignore_index", "0"), case("data.num_classes", "1"),
    case("data.num_classes", "0"), case("data.num_classes", "-5"),
    case("data.num_classes", "300", "data.class_names=null"), case("data.num_classes", "0", recipe=DET),
    case("data.class_names", "[a, b, a, c, d, e]", recipe=DET),
    case("data.source.options.num_images", "-3"), case("data.target.options.num_images", "ten"),
    case("data.target.options.height", "0"), case("data.target_val.options.width", "-1"),
    case("data.source.options.seed", "-1"), case("data.source.options.num_images", "-1", recipe=DET),
    # seeds and counts
    case("seed", "-1"), case("seed", str(2**63)), case("rounds.count", "-1"), case("rounds.count", "1001"),
    case("rounds.steps", "0"), case("rounds.steps", "-5"), case("rounds.target_epochs", "0"),
    case("rounds.target_epochs", "-1"), case("rounds.target_epochs", "nan"), case("source_training.steps", "-1"),
    case("checkpoint.every_steps", "0"), case("checkpoint.every_steps", "-1"),
    # crops, scales, test-time views
    case("augment.crop", "[0, 4]"), case("augment.crop", "[-1, 64]"), case("augment.crop", "[64]"),
    case("augment.scale", "[0, 1.3]", "augment.crop=[32, 32]"),
    case("augment.scale", "[-1, 2]", "augment.crop=[32, 32]"),
    case("augment.scale", "[1.3, 0.7]", "augment.crop=[32, 32]"), case("augment.scale", "[0.7, 1.3]"),
    case("eval.scales", "[]"), case("eval.scales", "[0]"), case("eval.scales", "[1.0, -0.5]"),
    case("eval.scales", "[.nan]"), case("policy.scales", "[]"), case("policy.scales", "[0.0]"),
    case("policy.mining.rare_share", "-0.1"), case("policy.mining.rare_share", "1.5"),
    case("policy.mining.probability", "-0.1"), case("policy.mining.probability", "2"),
    # the schedule, round by round
    case("rounds.portion", "{start: 0, step: 0.05, max: 0.5}"),
    case("rounds.portion", "{start: -0.1, step: 0.1, max: 0.5}"),
    case("rounds.portion", "{start: 0.5, step: 0.3, max: 1.5}"),
    case("rounds.portion", "{start: 0.2, step: 0.1, max: 0}"),
    case("rounds.portion", "{start: 0.9, step: 0.01, max: 1.2}", "rounds.count=30"),
    case("rounds.portion", "{start: 0.5, step: -0.2, max: 1}", "rounds.count=4"),
    case("rounds.portion.step", "nan"), case("rounds.portion.start", "inf"),
    case("rounds.source_share", "{start: -0.1, step: 0, max: 1}"),
    case("rounds.source_share", "{start: 0.5, step: 0.3, max: 2}"),
    case("rounds.source_share.max", ".nan"),
    # loss terms
    bad_loss("weight", "-1"), bad_loss("weight", ".nan"), bad_loss("lr", "-1"), bad_loss("lr", "nan"),
    bad_loss("lr", "0"), bad_loss("momentum", "1"), bad_loss("weight_decay", "-1"), bad_loss("betas", "[0.9, 1.0]"),
    bad_loss("betas", "[0.9]"), bad_loss("lr", "fast"),
    # names and devices
    case("name", "../../x"), case("name", "/abs"), case("name", "''"), case("name", "a/b"), case("name", "'a\\b'"),
    case("name", ".hidden"), case("name", '"a\\0b"'), case("name", "'..'"), case("name", "x" * 201),
    case("name", "'run name'"), case("device", "gpu"), case("device", "cuda:x"),
]


@pytest.mark.parametrize("path, overrides, recipe", BAD)
def test_bad_value_is_one_line_naming_the_key(path, overrides, recipe):
    with pytest.raises(ConfigError) as info:
        load_recipe(recipe, overrides)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, message
    assert path in message, message
    assert ";" in message, message  # problem; fix


def test_the_table_is_large():
    assert len(BAD) >= 60


@pytest.mark.parametrize("overrides, key, expected", [
    (["rounds.optim.lr=1e6"], "rounds.optim.lr", 1e6),
    (["rounds.optim.lr=1E6"], "rounds.optim.lr", 1e6),
    (["rounds.optim.lr=+1e6"], "rounds.optim.lr", 1e6),
    (["rounds.optim.lr=1e-300"], "rounds.optim.lr", 1e-300),
    (["source_training.optim.momentum=.5"], "source_training.optim.momentum", 0.5),
    (["rounds.optim.momentum=0"], "rounds.optim.momentum", 0.0),
    (["rounds.optim.weight_decay=0"], "rounds.optim.weight_decay", 0.0),
    (["rounds.portion.step=-2.5e-4"], "rounds.portion.step", -2.5e-4),
    (["rounds.portion={start: 1, step: 0, max: 1}"], "rounds.portion.start", 1.0),
    (["rounds.source_share={start: 0, step: 0.5, max: 1}"], "rounds.source_share.max", 1.0),
    (["rounds.count=0", "rounds.portion.start=5"], "rounds.portion.start", 5.0),  # no round uses it
    (["rounds.count=1000"], "rounds.count", 1000),
    (["data.ignore_index=10"], "data.ignore_index", 10),
    (["seed=9223372036854775807"], "seed", 2**63 - 1),
    (["data.num_workers=0"], "data.num_workers", 0),
    (["rounds.batch_source=0"], "rounds.batch_source", 0),
    (["augment.crop=[1, 1]"], "augment.crop", [1, 1]),
    (["augment.crop=[32, 32]", "augment.scale=[1e-1, 2E0]"], "augment.scale", [0.1, 2.0]),
    (["policy.mining.probability=1", "policy.mining.rare_share=0"], "policy.mining.probability", 1.0),
    (["eval.scales=[5e-1, 1, 1.5e0]"], "eval.scales", [0.5, 1.0, 1.5]),
    (["name=a.b-c_1"], "name", "a.b-c_1"),
    (["name='1e-3'"], "name", "1e-3"),  # quoted, a string field keeps the text
    (["device=cuda:0"], "device", "cuda:0"),
    (["data.source.options.num_images=0"], "data.source.options", {"num_images": 0, "seed": 0, "height": 64,
                                                                    "width": 128}),
])
def test_edge_values_load(overrides, key, expected):
    cfg = load_recipe(SEG, overrides)
    assert get(cfg, key) == expected


def get(obj, key: str):
    for part in key.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def test_float_text_in_a_recipe_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"extends: {SEG}\nrounds: {{optim: {{lr: 1e-3}}, target_epochs: 1E1}}\n"
                    "losses: [{name: output_space, options: {optim: {lr: 2e-4, betas: [9e-1, .99]}}}]\n")
    cfg = load_recipe(path)
    assert (cfg.rounds.optim.lr, cfg.rounds.target_epochs) == (1e-3, 10.0)
    assert cfg.losses[0].options["optim"] == {"lr": 2e-4, "betas": [0.9, 0.99]}


def test_text_that_is_not_a_number_stays_refused():
    for text in ("1e", "e3", "1.2.3", "0x1p3", "1_0e3", " 1e3", "1e3 "):
        with pytest.raises(ConfigError, match=r"rounds\.optim\.lr must be a number"):
            load_recipe(SEG, [f"rounds.optim.lr='{text}'"])


def test_a_ramp_names_the_first_round_outside():
    with pytest.raises(ConfigError, match=r"rounds\.portion gives round 12 a portion of 1\.01, outside \(0, 1\]"):
        load_recipe(SEG, ["rounds.count=40", "rounds.portion={start: 0.9, step: 0.01, max: 1.5}"])
    with pytest.raises(ConfigError, match=r"rounds\.portion gives round 4 a portion of -0\.1"):
        load_recipe(SEG, ["rounds.count=4", "rounds.portion={start: 0.5, step: -0.2, max: 1}"])


def test_messages_give_the_range_and_a_fix():
    with pytest.raises(ConfigError, match=r"^rounds\.optim\.lr must be positive, got -0\.1; give a finite number > 0, "
                                          r"e\.g\. 1e-4$"):
        load_recipe(SEG, ["rounds.optim.lr=-0.1"])
    with pytest.raises(ConfigError, match=r"^rounds\.optim\.lr must be a finite number, got nan; give a finite"):
        load_recipe(SEG, ["rounds.optim.lr=nan"])
    with pytest.raises(ConfigError, match=r"momentum must be in \[0, 1\), got 1\.0; give a number in \[0, 1\)"):
        load_recipe(SEG, ["rounds.optim.momentum=1"])
    with pytest.raises(ConfigError, match=r"data\.ignore_index = 3 is a class .*set data\.ignore_index: 255"):
        load_recipe(SEG, ["data.ignore_index=3"])
    with pytest.raises(ConfigError, match=r"letters a-z A-Z, digits, '\.', '_' and '-', not starting with '\.'"):
        load_recipe(SEG, ["name=../../x"])


def test_a_detection_recipe_may_use_any_ignore_index_below_its_classes():
    assert load_recipe(DET, ["data.ignore_index=0"]).data.ignore_index == 0


def numeric_fields(cls: type, prefix: str = ""):
    """(key path, field) of every int or float field under ``cls``, lists and optionals included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        while typing.get_args(tp) and typing.get_origin(tp) is not typing.Literal:
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if dataclasses.is_dataclass(tp):
            yield from numeric_fields(tp, f"{prefix}{f.name}.")
        elif tp in (int, float):
            yield f"{prefix}{f.name}", f


def test_every_numeric_field_has_a_range_its_default_meets():
    paths = dict(numeric_fields(RunConfig))
    assert {"rounds.optim.lr", "rounds.portion.step", "losses.weight", "augment.crop", "seed"} <= set(paths)
    unbounded = [p for p, f in paths.items() if not isinstance(f.metadata.get("bound"), Bound)]
    assert not unbounded
    for path, f in paths.items():
        if f.default is not dataclasses.MISSING and f.default is not None:
            assert f.metadata["bound"].holds(f.default), path


def test_a_name_that_is_a_path_stops_the_run_before_any_folder(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from selftrain.cli import main

    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    result = CliRunner().invoke(main, ["run", str(SEG), "--set", "name=../../escaped"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: name '../../escaped'")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b"]
