"""Properties of recipe loading: whatever mapping a recipe file holds and whatever a ``--set`` says,
loading gives a RunConfig or one ConfigError line, never another exception; a float written in any
form a user types reads back as that float."""

from __future__ import annotations

import dataclasses
import math
import tempfile
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selftrain.config import RunConfig, load_recipe
from selftrain.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SEG = REPO / "recipes" / "defaults.yaml"
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def key_paths(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key path of the schema, sections included."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        out.append(prefix + f.name)
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        for sub in ([tp] if dataclasses.is_dataclass(tp) else inner):
            out += key_paths(sub, f"{prefix}{f.name}.")
    return out


PATHS = key_paths(RunConfig) + ["data.source.options.num_images", "data.target.options.seed",
                                "losses", "model.options.width", "rounds.portion.start"]
WORDS = st.sampled_from(sorted({p.split(".")[-1] for p in PATHS}))
SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-2**70, max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | st.sampled_from(["1e-3", "1E6", "+1e6", ".5", "-2.5e-4", "nan", "inf", "sgd", "cbst", "cpu", "run",
                              "segmentation", "detection", "rounds", "source", "fp16", "output_space", "tiny_seg"]))
KEYS = WORDS | st.text(max_size=8) | st.integers(-3, 3) | st.none() | st.booleans()
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(KEYS, inner, max_size=4), max_leaves=12)


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


def nest(path: str, value: object) -> dict:
    for part in reversed(path.split(".")):
        value = {part: value}
    return value


def loads_or_refuses(recipe: Path, overrides: list[str] = ()) -> None:
    try:
        cfg = load_recipe(recipe, overrides)
    except ConfigError as exc:
        message = str(exc)
        assert message and len(message.splitlines()) == 1, message
    else:
        assert isinstance(cfg, RunConfig)


@FAST
@given(path=st.sampled_from(PATHS) | st.lists(WORDS, min_size=1, max_size=3).map(".".join), value=VALUES,
       extend=st.booleans())
def test_any_mapping_in_a_recipe_loads_or_is_one_config_error(folder, path, value, extend):
    recipe = folder / "r.yaml"
    data = nest(path, value)
    if extend:
        data = {"extends": str(SEG), **data}
    recipe.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    loads_or_refuses(recipe)


@FAST
@given(path=st.sampled_from(PATHS) | st.text(max_size=16), text=st.text(max_size=24)
       | st.sampled_from(["1e-3", "[1, 2]", "{a: 1}", "&a [*a]", "&a {x: *a}", "2001-13-45", "9" * 5000,
                          "!!python/object:os.system", "'", "{", ".nan", "-.inf", "0x1f", "1:30", "~"]))
def test_any_set_string_loads_or_is_one_config_error(path, text):
    loads_or_refuses(SEG, [f"{path}={text}"])


def test_recipe_text_python_yaml_cannot_build_is_one_config_error(folder):
    for text in ("seed: 2001-13-45\n", f"seed: {'9' * 5000}\n", "name: !!binary AAAA\n", "\xff\xfe"):
        (folder / "bad.yaml").write_bytes(text.encode("latin-1") if text.startswith("\xff") else text.encode())
        with pytest.raises(ConfigError):
            load_recipe(folder / "bad.yaml")


def user_forms(x: float) -> list[str]:
    """The ways a user writes ``x``: repr, exponent forms in either case, a plus sign, no leading zero."""
    forms = [repr(x), f"{x:e}", f"{x:E}", f"{x:.17g}", f"{x:.17e}".replace("e+", "e")]
    if math.copysign(1.0, x) > 0:
        forms += [f"+{x:.17e}", f"+{x!r}"]
    if repr(x).startswith("0."):
        forms.append(repr(x)[1:])
    if repr(x).startswith("-0."):
        forms.append("-" + repr(x)[2:])
    return forms


FINITE = st.floats(allow_nan=False, allow_infinity=False)


@FAST
@given(x=FINITE, form=st.integers(0, 8), in_file=st.booleans())
def test_a_finite_float_in_any_user_form_reads_back(folder, x, form, in_file):
    """``rounds.portion.step`` takes any finite number when no round uses it (count 0); lr any positive one."""
    step_forms, lr_forms = user_forms(x), user_forms(abs(x) or 1e-4)
    step_text, lr_text = step_forms[form % len(step_forms)], lr_forms[form % len(lr_forms)]
    if in_file:
        recipe = folder / "f.yaml"
        recipe.write_text(f"extends: {SEG}\nrounds: {{count: 0, portion: {{step: {step_text}}}, "
                          f"optim: {{lr: {lr_text}}}}}\n")
        cfg = load_recipe(recipe)
    else:
        cfg = load_recipe(SEG, ["rounds.count=0", f"rounds.portion.step={step_text}", f"rounds.optim.lr={lr_text}"])
    assert cfg.rounds.portion.step == float(step_text) and cfg.rounds.optim.lr == float(lr_text)
    assert math.isclose(cfg.rounds.portion.step, x, rel_tol=1e-6, abs_tol=1e-300)
