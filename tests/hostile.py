"""Hostile inputs for the CLI: the case tables and the harness that checks the rule for bad input.

The rule (DESIGN.md §7, the CLI's ``user_errors``): a command given bad input exits with code 2,
prints one line ``error: <problem>; <fix>`` on stderr that names the problem (the recipe key path,
or the file), prints no traceback, and changes no file of the user. A :class:`Case` is an id, its
family, the argv (``{name}`` fields filled from what the setup returns), a setup that writes the
inputs under the case's folder, and strings the error line must contain. The harness hashes every
file under the case's folder before and after the command; a pre-existing file that changed or
vanished, a checkpoint or pseudo-label file that appeared, or any new file outside the folders a
case allows, breaks the rule. Import as ``from hostile import CASES, check`` (``tests`` is on the path).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import torch
import yaml
from det_layouts import Obj, voc_xml_text, write_clipart, write_coco, write_voc
from layouts import write_cityscapes, write_gta5

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = REPO / "recipes" / "defaults.yaml"
DET_DEFAULTS = REPO / "recipes" / "det_defaults.yaml"
VOC20 = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
         "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]


def tiny_recipe() -> dict[str, Any]:
    """The smallest segmentation run on the synthetic benchmark: one step of each phase."""
    return {
        "extends": str(DEFAULTS),
        "name": "tiny",
        "data": {"source": {"options": {"num_images": 8, "height": 32, "width": 64}},
                 "target": {"options": {"num_images": 6, "height": 32, "width": 64}},
                 "target_val": {"options": {"num_images": 4, "height": 32, "width": 64}}},
        "model": {"name": "tiny_seg", "options": {"width": 8}},
        "source_training": {"steps": 1, "batch_size": 4},
        "rounds": {"count": 2, "steps": 1, "batch_source": 2, "batch_target": 2},
        "eval": {"batch_size": 4},
        "pseudo_batch_size": 4,
    }


def seg_files_recipe(tmp: Path) -> dict[str, Any]:
    """Tiny run on GTA5 -> Cityscapes copies in their official layouts (19 train ids)."""
    raw = tiny_recipe()
    raw["name"] = "segfiles"
    raw["data"] = {"num_classes": 19, "class_names": None,
                   "source": {"name": "gta5", "root": str(tmp / "gta5"), "options": {}},
                   "target": {"name": "cityscapes", "root": str(tmp / "cs"), "split": "train", "options": {}},
                   "target_val": {"name": "cityscapes", "root": str(tmp / "cs"), "split": "val", "options": {}}}
    return raw


def det_files_recipe(tmp: Path, target: str = "clipart") -> dict[str, Any]:
    """Tiny detection run: VOC2007 -> Clipart1k (or a COCO-format target) copies, 20 VOC classes."""
    if target == "coco":
        tgt = {"name": "coco", "root": str(tmp / "coco"), "split": "val", "options": {}}
    else:
        tgt = {"name": "clipart", "root": str(tmp / "clipart"), "split": "train", "options": {}}
    return {
        "extends": str(DET_DEFAULTS),
        "name": "detfiles",
        "data": {"num_classes": 20, "class_names": VOC20,
                 "source": {"name": "voc", "root": str(tmp / "VOCdevkit"), "split": "trainval", "options": {}},
                 "target": dict(tgt), "target_val": dict(tgt)},
        "model": {"name": "tiny_ssd", "options": {"width": 16}},
        "source_training": {"steps": 1, "batch_size": 2},
        "rounds": {"count": 1, "steps": 1, "batch_source": 0, "batch_target": 2},
        "eval": {"batch_size": 3},
        "pseudo_batch_size": 3,
    }


def merge(base: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    """``delta`` over a copy of ``base``; nested mappings merge."""
    out = copy.deepcopy(base)
    for key, value in delta.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def nested(path: str, value: Any) -> dict[str, Any]:
    """``nested("a.b", 1) == {"a": {"b": 1}}``."""
    for part in reversed(path.split(".")):
        value = {part: value}
    return value


def dump(path: Path, raw: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------
# The harness


@dataclass(frozen=True)
class Env:
    """What every case may use: the case's folder and a finished tiny run to copy from."""

    tmp: Path
    run: Path


Setup = Callable[[Env], dict[str, str]]


@dataclass(frozen=True)
class Case:
    """One hostile input: fields ``{tmp}`` and those the setup returns are filled in ``argv`` and ``contains``."""

    id: str
    family: str
    argv: tuple[str, ...]
    setup: Setup
    contains: tuple[str, ...] = ()
    may_write: tuple[str, ...] = ()  # folders under tmp where new files (not .pt / .h5) may appear
    slow: bool = False

    def args(self, subs: dict[str, str]) -> list[str]:
        return [a.format(**subs) for a in self.argv]

    def names(self, subs: dict[str, str]) -> list[str]:
        return [s.format(**subs) for s in self.contains]


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def violations(case: Case, subs: dict[str, str], result: Any, before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Every way ``result`` breaks the rule for bad input (empty: it keeps it)."""
    problems = []
    stdout, stderr = result.stdout, result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        tb = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info else repr(result.exception)
        problems.append(f"uncaught {type(result.exception).__name__}: {result.exception}\n{tb[-1500:]}")
    if result.exit_code != 2:
        problems.append(f"exit code {result.exit_code}, expected 2")
    err_lines = [line for line in stderr.splitlines() if line.strip()]
    if len(err_lines) != 1 or not err_lines[0].startswith("error:"):
        problems.append(f"stderr must be one line starting with 'error:', got {len(err_lines)} lines: {err_lines[:4]}")
    elif not all(s in err_lines[0] for s in case.names(subs)):
        problems.append(f"error line does not name {case.names(subs)}: {err_lines[0]}")
    if any(line.lower().startswith("error:") for line in stdout.splitlines()):
        problems.append("an error line on stdout")
    if "Traceback" in stdout + stderr:
        problems.append("a traceback in the output")
    changed = sorted(k for k in before if after.get(k) != before[k])
    if changed:
        problems.append(f"files changed or removed: {changed[:5]}")
    new = sorted(set(after) - set(before))
    stores = [k for k in new if k.endswith((".pt", ".h5"))]
    if stores:
        problems.append(f"checkpoints or pseudo-label files appeared: {stores[:5]}")
    outside = [k for k in new if not any(Path(k).is_relative_to(w) for w in case.may_write)]
    if outside:
        problems.append(f"new files outside {case.may_write or 'nothing'}: {outside[:5]}")
    return problems


CASES: list[Case] = []


def add(case_id: str, family: str, argv: list[str] | tuple[str, ...], setup: Setup, contains: tuple[str, ...] = (),
        *, may_write: tuple[str, ...] = (), slow: bool = False) -> None:
    if any(c.id == case_id for c in CASES):
        raise ValueError(f"duplicate case id {case_id}")
    CASES.append(Case(case_id, family, tuple(argv), setup, tuple(contains), may_write, slow))


def nothing(env: Env) -> dict[str, str]:
    return {}


# ---------------------------------------------------------------------------------------------
# Family: recipes (a YAML file given to run)


RUN = ("run", "{recipe}", "--out", "{tmp}/run")


def recipe_setup(delta: dict[str, Any], base: Callable[[], dict[str, Any]] = tiny_recipe,
                 drop: tuple[str, ...] = ()) -> Setup:
    def setup(env: Env) -> dict[str, str]:
        raw = merge(base(), delta)
        for path in drop:
            *parents, last = path.split(".")
            node = raw
            for p in parents:
                node = node[p]
            node.pop(last, None)
        return {"recipe": str(dump(env.tmp / "recipes" / "r.yaml", raw))}
    return setup


def text_setup(content: str | bytes, name: str = "r.yaml") -> Setup:
    def setup(env: Env) -> dict[str, str]:
        path = env.tmp / "recipes" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)  # type: ignore[operator]
        return {"recipe": str(path)}
    return setup


def recipe_case(case_id: str, delta: dict[str, Any], contains: tuple[str, ...], **kwargs: Any) -> None:
    add(f"recipe-{case_id}", "recipe", RUN, recipe_setup(delta, **kwargs), contains, may_write=("run",))


UNKNOWN_KEYS = ["bogus", "data.bogus", "data.source.bogus", "data.target.bogus", "data.target_val.bogus", "model.bogus",
                "source_training.bogus", "source_training.optim.bogus", "policy.bogus", "policy.mining.bogus",
                "rounds.bogus", "rounds.portion.bogus", "rounds.source_share.bogus", "rounds.optim.bogus",
                "augment.bogus", "eval.bogus", "checkpoint.bogus"]
for _key in UNKNOWN_KEYS:
    recipe_case(f"unknown-{_key}", nested(_key, 1), (_key,))
recipe_case("unknown-losses[0].bogus", {"losses": [{"name": "output_space", "bogus": 1}]}, ("bogus",))
recipe_case("unknown-extends-typo", {"extend": "defaults.yaml"}, ("extend",))
for _key in ["data.source.options.bogus", "model.options.bogus", "policy.options.bogus"]:
    recipe_case(f"unknown-{_key}", nested(_key, 1), ("bogus",))
for _key, _value in [("model.name", "no_such_model"), ("policy.name", "no_such_policy"),
                     ("data.source.name", "no_such_set"), ("data.target.name", "no_such_set")]:
    recipe_case(f"unregistered-{_key}", nested(_key, _value), (_value,))
recipe_case("unregistered-losses[0].name", {"losses": [{"name": "no_such_loss"}]}, ("no_such_loss",))

WRONG_TYPES: list[tuple[str, Any]] = [
    ("seed", "zero"), ("seed", 1.5), ("name", 5), ("device", 3), ("precision", "fp64"), ("task", "classification"),
    ("data.num_classes", "ten"), ("data.class_names", "road"), ("data.ignore_index", 2.5), ("data.num_workers", "two"),
    ("data.source", 5), ("data.source.options", [1]), ("data.source.root", 7),
    ("model.options", 3), ("model.checkpoint", 4),
    ("source_training.enabled", 1), ("source_training.steps", 1.5), ("source_training.batch_size", "4"),
    ("source_training.lr_schedule", "cosine"), ("source_training.optim.name", "lion"),
    ("source_training.optim.lr", "fast"), ("source_training.optim", 0.1),
    ("policy.scales", 1.0), ("policy.scales", ["a"]), ("policy.flip", "no"), ("policy.options", [1]),
    ("rounds.count", [1]), ("rounds.steps", True), ("rounds.portion", 0.2), ("rounds.portion.start", "a fifth"),
    ("rounds.lr_decay", "linear"), ("rounds.optim.momentum", [0.9]),
    ("augment.flip", "yes"), ("augment.crop", 32), ("augment.crop", ["a", "b"]),
    ("eval.batch_size", None), ("eval.scales", "1.0"), ("eval.use_07", "yes"),
    ("pseudo_batch_size", 2.0), ("checkpoint.every_steps", "often"), ("losses", {"name": "output_space"}),
]
for _key, _value in WRONG_TYPES:
    recipe_case(f"type-{_key}={json.dumps(_value)}", nested(_key, _value), (_key,))
recipe_case("type-data", {"data": 5}, ("data",))
recipe_case("type-losses[0].weight", {"losses": [{"name": "output_space", "weight": "heavy"}]}, ("losses[0].weight",))

RANGES: list[tuple[str, Any]] = [
    ("source_training.batch_size", 0), ("source_training.batch_size", -1), ("eval.batch_size", 0),
    ("eval.batch_size", -2), ("pseudo_batch_size", 0), ("pseudo_batch_size", -1), ("rounds.batch_target", 0),
    ("rounds.batch_target", -1), ("rounds.batch_source", -1),
    ("source_training.optim.lr", 0), ("source_training.optim.lr", -1e-3), ("source_training.optim.lr", math.nan),
    ("source_training.optim.lr", math.inf), ("rounds.optim.lr", 0), ("rounds.optim.lr", -1e-3),
    ("rounds.optim.lr", math.nan), ("rounds.optim.lr", math.inf), ("rounds.optim.lr", -math.inf),
    ("source_training.optim.momentum", -0.1), ("rounds.optim.momentum", -0.5), ("rounds.optim.momentum", math.nan),
    ("source_training.optim.weight_decay", -1e-4), ("rounds.optim.weight_decay", -1.0),
    ("source_training.optim.head_lr_mult", 0), ("rounds.optim.accumulate", 0),
    ("rounds.optim.clip_grad_norm", -1.0), ("source_training.optim.clip_grad_norm", math.nan),
    ("data.num_workers", -1), ("data.ignore_index", -1), ("data.ignore_index", 256), ("data.ignore_index", 1000),
    ("data.num_classes", 1), ("data.num_classes", -3),
    ("data.source.options.height", 0), ("data.source.options.height", -32), ("data.target.options.width", 0),
    ("data.source.options.num_images", -1), ("data.target.options.num_images", -5),
    ("data.target_val.options.num_images", -2),
    ("augment.crop", [0, 32]), ("augment.crop", [-8, 32]), ("augment.crop", [16, 0]),
    ("augment.scale", [0.5, 1.5]),
    ("seed", -1), ("seed", 2**64), ("seed", 10**30),
    ("rounds.count", -1), ("source_training.steps", -1), ("rounds.steps", 0), ("rounds.steps", -3),
    ("checkpoint.every_steps", 0), ("eval.scales", []), ("eval.scales", [0.0]), ("policy.scales", [-1.0]),
    ("rounds.portion.start", 0), ("rounds.portion.start", 1.5), ("rounds.portion.max", 2.0),
    ("rounds.portion.start", math.nan), ("rounds.source_share.start", -0.1), ("rounds.source_share.max", 1.5),
    ("policy.mining.rare_share", -0.1), ("policy.mining.probability", 1.5),
]
for _key, _value in RANGES:
    # the portion ramp is one value per round: naming the ramp names the problem
    recipe_case(f"range-{_key}={_value}", nested(_key, _value),
                ("rounds.portion",) if _key.startswith("rounds.portion") else (_key,))
recipe_case("range-rounds.target_epochs=-1", {"rounds": {"steps": None, "target_epochs": -1.0}},
            ("rounds.target_epochs",))
recipe_case("range-rounds.target_epochs=0", {"rounds": {"steps": None, "target_epochs": 0.0}},
            ("rounds.target_epochs",))
recipe_case("range-portion-later-round-negative", {"rounds": {"count": 3, "portion": {"start": 0.2, "step": -0.15,
                                                                                      "max": 0.5}}},
            ("rounds.portion",))
recipe_case("range-portion-later-round-above-1", {"rounds": {"count": 3, "portion": {"start": 0.9, "step": 0.2,
                                                                                     "max": 1.5}}}, ("rounds.portion",))
recipe_case("range-source-share-later-round-negative",
            {"rounds": {"count": 3, "source_share": {"start": 0.1, "step": -0.1, "max": 1.0}}},
            ("rounds.source_share",))
recipe_case("range-class-names-length", {"data": {"class_names": ["a", "b"]}}, ("data.class_names",))
recipe_case("range-losses[0].weight=nan", {"losses": [{"name": "output_space", "weight": math.nan}]},
            ("losses[0].weight",))
recipe_case("range-losses[0].weight=-1", {"losses": [{"name": "output_space", "weight": -1.0}]},
            ("losses[0].weight",))
recipe_case("range-losses[0].phases", {"losses": [{"name": "output_space", "phases": ["warmup"]}]},
            ("losses[0].phases",))
recipe_case("huge-data.num_classes", {"data": {"num_classes": 10**30, "class_names": None}}, ("data.num_classes",))
recipe_case("huge-source_training.batch_size", {"source_training": {"batch_size": 10**30}},
            ("source_training.batch_size",))
recipe_case("range-rounds.optim.divergence_factor=1", {"rounds": {"optim": {"divergence_factor": 1}}},
            ("rounds.optim.divergence_factor",))
recipe_case("crop-not-a-multiple-of-the-encoder-stride",
            {"model": {"name": "smp_deeplabv3plus", "options": {"encoder": "resnet18"}}, "augment": {"crop": [60, 100]}},
            ("augment.crop",), drop=("model.options.width",))
recipe_case("huge-eval.batch_size-float", {"eval": {"batch_size": 1e300}}, ("eval.batch_size",))
recipe_case("huge-data.source.options.height", {"data": {"source": {"options": {"height": 10**30}}}}, ("height",))
for _name in ["../../x", "/abs/x", "", "a/b", ".", ".."]:
    recipe_case(f"name={_name!r}", {"name": _name}, ("name",))

# files that are not recipes
add("recipe-missing-file", "recipe", ("run", "{tmp}/absent.yaml", "--out", "{tmp}/run"), nothing, ("absent.yaml",))
add("recipe-directory", "recipe", ("run", "{tmp}", "--out", "{tmp}/run"), nothing, ("error:",))
for _id, _text in [("yaml-syntax", "name: [unclosed\nseed: 0\n"), ("yaml-tab-indent", "data:\n\tnum_classes: 3\n"),
                   ("yaml-duplicate-anchor", "a: *nope\n"), ("top-level-list", "- name: x\n- seed: 1\n"),
                   ("top-level-string", "just a string\n"), ("top-level-number", "42\n"),
                   ("empty-file", ""), ("only-comment", "# nothing here\n"),
                   ("python-tag", "!!python/object/apply:os.system ['true']\n")]:
    add(f"recipe-{_id}", "recipe", RUN, text_setup(_text), ("r.yaml",), may_write=("run",))
add("recipe-binary-file", "recipe", RUN, text_setup(bytes(range(256)) * 4), ("r.yaml",), may_write=("run",))
add("recipe-utf16-file", "recipe", RUN, text_setup("name: x\n".encode("utf-16")), ("r.yaml",), may_write=("run",))


def extends_setup(files: dict[str, str], main: str = "r.yaml") -> Setup:
    def setup(env: Env) -> dict[str, str]:
        for name, text in files.items():
            (env.tmp / "recipes").mkdir(parents=True, exist_ok=True)
            (env.tmp / "recipes" / name).write_text(text)
        return {"recipe": str(env.tmp / "recipes" / main)}
    return setup


add("recipe-extends-self", "recipe", RUN, extends_setup({"r.yaml": "extends: r.yaml\nname: x\n"}), ("r.yaml",),
    may_write=("run",))
add("recipe-extends-cycle", "recipe", RUN,
    extends_setup({"r.yaml": "extends: a.yaml\n", "a.yaml": "extends: b.yaml\n", "b.yaml": "extends: r.yaml\n"}),
    ("r.yaml",), may_write=("run",))
add("recipe-extends-missing-parent", "recipe", RUN, extends_setup({"r.yaml": "extends: parent.yaml\nname: x\n"}),
    ("parent.yaml",), may_write=("run",))
add("recipe-extends-broken-parent", "recipe", RUN,
    extends_setup({"r.yaml": "extends: p.yaml\nname: x\n", "p.yaml": "data: [unclosed\n"}), ("p.yaml",),
    may_write=("run",))
add("recipe-extends-list", "recipe", RUN, extends_setup({"r.yaml": "extends: [a.yaml, b.yaml]\n"}), ("extends",),
    may_write=("run",))
add("recipe-extends-number", "recipe", RUN, extends_setup({"r.yaml": "extends: 3\n"}), ("extends",),
    may_write=("run",))
add("recipe-extends-directory", "recipe", RUN, extends_setup({"r.yaml": "extends: .\n"}), ("extends",),
    may_write=("run",))
add("recipe-builtin-unknown", "recipe", ("run", "no_such_recipe", "--out", "{tmp}/run"), nothing, ("no_such_recipe",))

# the same recipe faults through the other commands that read recipes
for _cmd, _argv in [("evaluate", ("evaluate", "{recipe}", "--checkpoint", "{ckpt}")), ("data-check", ("data", "check", "{recipe}"))]:
    for _key, _value in [("bogus", 1), ("rounds.optim.lr", -1.0), ("eval.batch_size", 0), ("data.ignore_index", 300),
                         ("data.num_classes", "ten")]:
        def _setup(env: Env, _key: str = _key, _value: Any = _value) -> dict[str, str]:
            return {**recipe_setup(nested(_key, _value))(env), "ckpt": str(env.run / "checkpoints" / "round_000.pt")}
        add(f"recipe-{_cmd}-{_key}={_value}", "recipe", _argv, _setup, (_key,))


# ---------------------------------------------------------------------------------------------
# Family: --set overrides


def base_recipe(env: Env) -> dict[str, str]:
    return {"recipe": str(dump(env.tmp / "recipes" / "r.yaml", tiny_recipe()))}


SETS: list[tuple[str, tuple[str, ...]]] = [
    ("a", ("a",)), ("=1", ("=1",)), ("a..b=1", ("a..b",)), (".a=1", (".a",)), ("a.=1", ("a.",)), ("=", ("=",)),
    ("bogus=1", ("bogus",)), ("data.bogus=1", ("data.bogus",)), ("rounds.optim.bogus=1", ("rounds.optim.bogus",)),
    ("data.num_classes.x=1", ("data.num_classes",)), ("rounds.count=abc", ("rounds.count",)),
    ("rounds.count=1.5", ("rounds.count",)), ("seed=[1]", ("seed",)), ("data=5", ("data",)),
    ("rounds.optim.lr=-1", ("rounds.optim.lr",)), ("rounds.optim.lr=.nan", ("rounds.optim.lr",)),
    ("rounds.optim.lr=.inf", ("rounds.optim.lr",)), ("source_training.optim.lr=0", ("source_training.optim.lr",)),
    ("source_training.batch_size=0", ("source_training.batch_size",)), ("eval.batch_size=-1", ("eval.batch_size",)),
    ("pseudo_batch_size=0", ("pseudo_batch_size",)), ("rounds.batch_target=-2", ("rounds.batch_target",)),
    ("data.ignore_index=300", ("data.ignore_index",)), ("data.num_workers=-1", ("data.num_workers",)),
    ("seed=-1", ("seed",)), ("seed=18446744073709551616", ("seed",)), ("name=../../x", ("name",)),
    ("name=", ("name",)), ("augment.crop=[0,0]", ("augment.crop",)), ("rounds.portion.start=0", ("rounds.portion",)),
    ("task=nope", ("task",)), ("source_training.optim.momentum=-1", ("source_training.optim.momentum",)),
    ("rounds.optim.weight_decay=-0.1", ("rounds.optim.weight_decay",)), ("precision=fp8", ("precision",)),
    ("model.name=nope", ("nope",)), ("policy.name=nope", ("nope",)), ("rounds.count=-1", ("rounds.count",)),
    ("data.source.options.num_images=-3", ("num_images",)), ("rounds.target_epochs=-2", ("rounds.target_epochs",)),
    ("rounds.optim.name=lion", ("rounds.optim.name",)), ("augment.flip=maybe", ("augment.flip",)),
    ("rounds.portion=[1", ("rounds.portion",)),
]
for _item, _contains in SETS:
    add(f"set-run-{_item}", "set", (*RUN, "--set", _item), base_recipe, _contains, may_write=("run",))
for _item, _contains in [("a", ("a",)), ("bogus=1", ("bogus",)), ("rounds.optim.lr=-1", ("rounds.optim.lr",)),
                         ("data.ignore_index=-5", ("data.ignore_index",))]:
    add(f"set-data-check-{_item}", "set", ("data", "check", "{recipe}", "--set", _item), base_recipe, _contains)
    add(f"set-evaluate-{_item}", "set", ("evaluate", "{recipe}", "--checkpoint", "{ckpt}", "--set", _item),
        lambda env: {**base_recipe(env), "ckpt": str(env.run / "checkpoints" / "round_000.pt")}, _contains)
add("set-demo-bogus", "set", ("demo", "--out", "{tmp}/demo", "--set", "bogus=1"), nothing, ("bogus",),
    may_write=("demo",))
# Where the demo accepts the value it trains five runs: these settings keep that to seconds.
DEMO_FAST = tuple(a for s in ["source_training.steps=1", "rounds.count=1", "rounds.steps=1",
                              "data.source.options.num_images=4", "data.target.options.num_images=4",
                              "data.target_val.options.num_images=4", "source_training.batch_size=2",
                              "rounds.batch_source=2", "rounds.batch_target=2"] for a in ("--set", s))
add("set-demo-negative-lr", "set", ("demo", "--out", "{tmp}/demo", *DEMO_FAST, "--set", "rounds.optim.lr=-1"), nothing,
    ("rounds.optim.lr",), may_write=("demo",), slow=True)
add("cli-demo-seeds-negative", "cli", ("demo", "--out", "{tmp}/demo", *DEMO_FAST, "--seeds", "-1"), nothing, ("seed",),
    may_write=("demo",), slow=True)


# ---------------------------------------------------------------------------------------------
# Family: data sets in their real layouts, through `data check` and `run`


def seg_data(damage: Callable[[Path], None]) -> Setup:
    def setup(env: Env) -> dict[str, str]:
        write_gta5(env.tmp / "gta5", n=3, mismatched=0)
        write_cityscapes(env.tmp / "cs", splits={"train": 2, "val": 2}, foggy=False)
        damage(env.tmp)
        return {"recipe": str(dump(env.tmp / "recipes" / "r.yaml", seg_files_recipe(env.tmp)))}
    return setup


def det_data(damage: Callable[[Path], None], target: str = "clipart") -> Setup:
    def setup(env: Env) -> dict[str, str]:
        write_voc(env.tmp / "VOCdevkit", year=2007, split="trainval")
        if target == "coco":
            write_coco(env.tmp / "coco", split="val")
        else:
            write_clipart(env.tmp / "clipart", split="train")
        damage(env.tmp)
        return {"recipe": str(dump(env.tmp / "recipes" / "r.yaml", det_files_recipe(env.tmp, target)))}
    return setup


CS_VAL_IMAGE = "cs/leftImg8bit/val/frankfurt/frankfurt_000000_000019_leftImg8bit.png"
CS_VAL_LABEL = "cs/gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_labelIds.png"
CS_TRAIN_IMAGE = "cs/leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
GTA_IMAGE, GTA_LABEL = "gta5/images/00002.png", "gta5/labels/00002.png"


def remove(rel: str) -> Callable[[Path], None]:
    def damage(tmp: Path) -> None:
        target = tmp / rel
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return damage


def empty_dir(rel: str) -> Callable[[Path], None]:
    def damage(tmp: Path) -> None:
        shutil.rmtree(tmp / rel)
        (tmp / rel).mkdir()
    return damage


def zero_bytes(rel: str) -> Callable[[Path], None]:
    return lambda tmp: (tmp / rel).write_bytes(b"")


def truncate(rel: str) -> Callable[[Path], None]:
    def damage(tmp: Path) -> None:
        data = (tmp / rel).read_bytes()
        (tmp / rel).write_bytes(data[: len(data) // 2])
    return damage


def text(rel: str, content: str = "this is not an image\n") -> Callable[[Path], None]:
    return lambda tmp: (tmp / rel).write_text(content)


def array_png(rel: str, array_of: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], None]:
    from PIL import Image

    def damage(tmp: Path) -> None:
        old = np.asarray(Image.open(tmp / rel))
        Image.fromarray(array_of(old)).save(tmp / rel)
    return damage


SEG_DAMAGE: list[tuple[str, Callable[[Path], None], tuple[str, ...]]] = [
    ("gta5-root-missing", remove("gta5"), ("gta5",)),
    ("cityscapes-root-missing", remove("cs"), ("cs",)),
    ("gta5-root-empty", empty_dir("gta5"), ("gta5",)),
    ("cityscapes-root-empty", empty_dir("cs"), ("cs",)),
    ("cityscapes-val-split-empty", empty_dir("cs/leftImg8bit/val"), ("val",)),
    ("gta5-label-missing", remove(GTA_LABEL), ("00002",)),
    ("cityscapes-val-label-missing", remove(CS_VAL_LABEL), ("frankfurt_000000_000019",)),
    ("cityscapes-val-image-zero-bytes", zero_bytes(CS_VAL_IMAGE), ("frankfurt_000000_000019",)),
    ("cityscapes-val-image-truncated", truncate(CS_VAL_IMAGE), ("frankfurt_000000_000019",)),
    ("cityscapes-train-image-text", text(CS_TRAIN_IMAGE), ("aachen_000000_000019",)),
    ("cityscapes-val-label-zero-bytes", zero_bytes(CS_VAL_LABEL), ("frankfurt_000000_000019",)),
    ("cityscapes-val-label-truncated", truncate(CS_VAL_LABEL), ("frankfurt_000000_000019",)),
    ("cityscapes-val-label-wrong-size", array_png(CS_VAL_LABEL, lambda a: a[:16, :40].copy()),
     ("frankfurt_000000_000019",)),
    ("cityscapes-val-label-id-200", array_png(CS_VAL_LABEL, lambda a: np.full_like(a, 200)),
     ("frankfurt_000000_000019",)),
    ("gta5-image-zero-bytes", zero_bytes(GTA_IMAGE), ("00002",)),
    ("gta5-image-truncated", truncate(GTA_IMAGE), ("00002",)),
    ("gta5-label-text", text(GTA_LABEL), ("00002",)),
]


def voc_xml(rel: str, objects: list[Obj], size: tuple[int, int] = (24, 32)) -> Callable[[Path], None]:
    return lambda tmp: (tmp / rel).write_text(voc_xml_text(Path(rel).stem + ".jpg", size, objects))


def edit_text(rel: str, edit: Callable[[str], str]) -> Callable[[Path], None]:
    return lambda tmp: (tmp / rel).write_text(edit((tmp / rel).read_text()))


VOC = "VOCdevkit/VOC2007"
VOC_XML, VOC_JPG, VOC_LIST = f"{VOC}/Annotations/000001.xml", f"{VOC}/JPEGImages/000001.jpg", \
    f"{VOC}/ImageSets/Main/trainval.txt"
CLIPART_XML, CLIPART_JPG = "clipart/Annotations/c003.xml", "clipart/JPEGImages/c003.jpg"
COCO_JSON = "coco/annotations/instances_val.json"


def coco_edit(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def damage(tmp: Path) -> None:
        data = json.loads((tmp / COCO_JSON).read_text())
        edit(data)
        (tmp / COCO_JSON).write_text(json.dumps(data))
    return damage


def _coco_bbox(data: dict[str, Any], bbox: list[float]) -> None:
    data["annotations"][0]["bbox"] = bbox


DET_DAMAGE: list[tuple[str, Callable[[Path], None], tuple[str, ...], str]] = [
    ("voc-root-missing", remove("VOCdevkit"), ("VOCdevkit",), "clipart"),
    ("voc-root-empty", empty_dir("VOCdevkit"), ("VOCdevkit",), "clipart"),
    ("clipart-root-missing", remove("clipart"), ("clipart",), "clipart"),
    ("voc-xml-malformed", edit_text(VOC_XML, lambda t: t[: len(t) // 2]), ("000001.xml",), "clipart"),
    ("voc-xml-not-xml", text(VOC_XML, "{json: maybe}"), ("000001.xml",), "clipart"),
    ("voc-xml-zero-bytes", zero_bytes(VOC_XML), ("000001.xml",), "clipart"),
    ("voc-xml-box-not-a-number", edit_text(VOC_XML, lambda t: t.replace("<xmin>3</xmin>", "<xmin>abc</xmin>")),
     ("000001",), "clipart"),
    ("voc-xml-no-bndbox", edit_text(VOC_XML, lambda t: t.replace("<bndbox>", "<bbox>").replace("</bndbox>", "</bbox>")),
     ("000001",), "clipart"),
    ("voc-xml-missing", remove(VOC_XML), ("000001",), "clipart"),
    ("voc-jpeg-missing", remove(VOC_JPG), ("000001",), "clipart"),
    ("voc-jpeg-zero-bytes", zero_bytes(VOC_JPG), ("000001",), "clipart"),
    ("voc-jpeg-truncated", truncate(VOC_JPG), ("000001",), "clipart"),
    ("voc-list-missing-id", edit_text(VOC_LIST, lambda t: t + "999999\n"), ("999999",), "clipart"),
    ("voc-list-repeated-id", edit_text(VOC_LIST, lambda t: t + "000001\n"), ("000001",), "clipart"),
    ("voc-list-empty", text(VOC_LIST, ""), ("trainval",), "clipart"),
    ("voc-list-missing", remove(VOC_LIST), ("trainval",), "clipart"),
    ("clipart-jpeg-text", text(CLIPART_JPG), ("c003",), "clipart"),
    ("clipart-xml-unknown-class", voc_xml(CLIPART_XML, [Obj("spaceship", (1, 1, 9, 9))]), ("spaceship",), "clipart"),
    ("coco-json-malformed", edit_text(COCO_JSON, lambda t: t[: len(t) // 2]), ("instances_val.json",), "coco"),
    ("coco-json-zero-bytes", zero_bytes(COCO_JSON), ("instances_val.json",), "coco"),
    ("coco-json-list", text(COCO_JSON, "[]"), ("instances_val.json",), "coco"),
    ("coco-json-no-images", coco_edit(lambda d: d.pop("images")), ("images",), "coco"),
    ("coco-annotation-unknown-image", coco_edit(lambda d: d["annotations"][0].update(image_id=999)), ("999",), "coco"),
    ("coco-annotation-unknown-category", coco_edit(lambda d: d["annotations"][0].update(category_id=777)), ("777",),
     "coco"),
    ("coco-bbox-not-numbers", coco_edit(lambda d: _coco_bbox(d, ["a", "b", "c", "d"])), ("instances_val.json",),
     "coco"),
    ("coco-image-file-missing", remove("coco/val/a/frame_01.jpg"), ("frame_01",), "coco"),
    ("coco-repeated-image-id", coco_edit(lambda d: d["images"].append(dict(d["images"][0]))), ("instances_val.json",),
     "coco"),
]

# A run reads the target training images when it first labels them, after round 0: a damaged one
# stops it there with round 0 kept for --resume (the data check decodes every image beforehand).
READ_AFTER_ROUND_0 = {"cityscapes-train-image-text"}
for _id, _damage, _contains in SEG_DAMAGE:
    add(f"data-check-{_id}", "data", ("data", "check", "{recipe}"), seg_data(_damage), _contains)
    if _id not in READ_AFTER_ROUND_0:
        add(f"data-run-{_id}", "data", RUN, seg_data(_damage), _contains, may_write=("run",))
for _id, _damage, _contains, _target in DET_DAMAGE:
    add(f"data-check-{_id}", "data", ("data", "check", "{recipe}"), det_data(_damage, _target), _contains)
    add(f"data-run-{_id}", "data", RUN, det_data(_damage, _target), _contains, may_write=("run",))
add("data-check-cityscapes-split-typo", "data", ("data", "check", "{recipe}", "--set", "data.target_val.split=vall"),
    seg_data(lambda tmp: None), ("vall",))
add("data-check-voc-year-missing", "data", ("data", "check", "{recipe}", "--set", "data.source.options.year=2012"),
    det_data(lambda tmp: None), ("VOC2012",))


# ---------------------------------------------------------------------------------------------
# Family: run folders


def copied_run(damage: Callable[[Path], None] = lambda run: None, recipe_delta: dict[str, Any] | None = None) -> Setup:
    """A copy of the session's finished tiny run at {tmp}/run, damaged, and the recipe that made it."""
    def setup(env: Env) -> dict[str, str]:
        shutil.copytree(env.run, env.tmp / "run")
        damage(env.tmp / "run")
        raw = merge(tiny_recipe(), recipe_delta or {})
        return {"recipe": str(dump(env.tmp / "recipes" / "r.yaml", raw)), "run": str(env.tmp / "run")}
    return setup


def _out_file(env: Env) -> dict[str, str]:
    (env.tmp / "run").write_text("my notes\n")
    return base_recipe(env)


def _out_foreign(env: Env) -> dict[str, str]:
    (env.tmp / "run").mkdir()
    (env.tmp / "run" / "thesis.tex").write_text("\\documentclass{article}\n")
    return base_recipe(env)


def _cut_last_round(run: Path) -> None:
    """Stop the copy after round 1 so that --resume has work left."""
    (run / "checkpoints" / "round_002.pt").unlink()
    (run / "pseudo" / "round_002.h5").unlink()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")


def _then(*steps: Callable[[Path], None]) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        for step in steps:
            step(run)
    return damage


add("run-out-is-file", "run", RUN, _out_file, ("run",))
add("run-out-under-file", "run", ("run", "{recipe}", "--out", "{tmp}/run/sub"), _out_file, ("run",))
add("run-out-foreign-folder", "run", RUN, _out_foreign, ("run",))
add("run-out-foreign-folder-resume", "run", (*RUN, "--resume"), _out_foreign, ("run",))
add("run-existing-without-resume", "run", RUN, copied_run(), ("run",))
add("run-existing-cut-without-resume", "run", RUN, copied_run(_cut_last_round), ("run",))
add("run-resume-other-recipe-seed", "run", (*RUN, "--resume"), copied_run(_cut_last_round, {"seed": 7}), ("{run}",))
add("run-resume-other-recipe-model", "run", (*RUN, "--resume"),
    copied_run(_cut_last_round, {"model": {"options": {"width": 16}}}), ("{run}",))
add("run-resume-other-recipe-policy", "run", (*RUN, "--resume"),
    copied_run(_cut_last_round, {"policy": {"name": "st"}}), ("{run}",))
add("run-resume-other-recipe-set", "run", (*RUN, "--resume", "--set", "source_training.optim.lr=0.5"),
    copied_run(_cut_last_round), ("{run}",))
add("run-resume-metrics-garbage", "run", (*RUN, "--resume"),
    copied_run(_then(_cut_last_round, lambda r: (r / "metrics.jsonl").write_text('{"round": 0,\nnot json\n'))),
    ("metrics.jsonl",))
add("run-resume-config-garbage", "run", (*RUN, "--resume"),
    copied_run(_then(_cut_last_round, lambda r: (r / "config.yaml").write_text("rounds: [unclosed\n"))),
    ("config.yaml",))
add("run-resume-config-zero-bytes", "run", (*RUN, "--resume"),
    copied_run(_then(_cut_last_round, lambda r: (r / "config.yaml").write_bytes(b""))), ("config.yaml",))
add("run-resume-config-list", "run", (*RUN, "--resume"),
    copied_run(_then(_cut_last_round, lambda r: (r / "config.yaml").write_text("- 1\n- 2\n"))), ("config.yaml",))
add("run-resume-config-missing", "run", (*RUN, "--resume"),
    copied_run(_then(_cut_last_round, lambda r: (r / "config.yaml").unlink())), ("config.yaml",))
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


add("run-resume-checkpoint-truncated", "run", (*RUN, "--resume"),
    copied_run(_then(_cut_last_round, lambda r: _truncate(r / "checkpoints" / "round_001.pt"),
                     lambda r: _truncate(r / "checkpoints" / "last.pt"))), (".pt",))
add("run-resume-checkpoint-text", "run", (*RUN, "--resume"),
    copied_run(_then(_cut_last_round, lambda r: (r / "checkpoints" / "round_001.pt").write_text("not a checkpoint"),
                     lambda r: (r / "checkpoints" / "last.pt").write_text("not a checkpoint"))), (".pt",))


# ---------------------------------------------------------------------------------------------
# Family: checkpoints, through `evaluate --checkpoint` and `model.checkpoint`


def _torch_bytes(obj: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


_MADE: dict[tuple[str, str], bytes] = {}


def made_checkpoint(kind: str, run: Path) -> bytes:
    """The bytes of a checkpoint of ``kind``, built once per session from the finished run."""
    key = (kind, str(run))
    if key not in _MADE:
        real = torch.load(run / "checkpoints" / "round_000.pt", map_location="cpu", weights_only=False)
        if kind == "other-architecture":
            state = dict(real, model=_adapter_state(merge(tiny_recipe(), {"model": {"options": {"width": 16}}})))
        elif kind == "detector":
            raw = {"extends": str(DET_DEFAULTS), "model": {"name": "tiny_ssd", "options": {"width": 16}}}
            state = dict(real, model=_adapter_state(raw))
        elif kind == "other-class-count":
            state = dict(real, model={k: (v[:5] if v.ndim and v.shape[0] == 10 else v) for k, v in real["model"].items()})
        elif kind == "linear-state-dict":
            state = dict(real, model=torch.nn.Linear(3, 4).state_dict())
        elif kind == "bare-state-dict":
            state = real["model"]
        elif kind == "model-not-a-dict":
            state = dict(real, model="weights")
        elif kind == "list":
            state = [1, 2, 3]
        else:
            raise ValueError(kind)
        _MADE[key] = _torch_bytes(state)
    return _MADE[key]


def _adapter_state(raw: dict[str, Any]) -> dict[str, torch.Tensor]:
    import tempfile

    from selftrain.build import build_adapter
    from selftrain.config import load_recipe

    with tempfile.TemporaryDirectory() as folder:
        cfg = load_recipe(dump(Path(folder) / "r.yaml", raw))
    return build_adapter(cfg).state_dict()


def checkpoint_file(kind: str) -> Callable[[Env], Path]:
    def make(env: Env) -> Path:
        path = env.tmp / "ckpt" / "model.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        real = env.run / "checkpoints" / "round_000.pt"
        if kind == "missing":
            return path
        if kind == "directory":
            path.mkdir()
        elif kind == "zero-bytes":
            path.write_bytes(b"")
        elif kind == "text":
            path.write_text("these are not weights\n")
        elif kind == "truncated":
            path.write_bytes(real.read_bytes()[: real.stat().st_size // 2])
        elif kind == "hdf5":
            shutil.copyfile(env.run / "pseudo" / "round_001.h5", path)
        else:
            path.write_bytes(made_checkpoint(kind, env.run))
        return path
    return make


CHECKPOINTS = ["missing", "directory", "zero-bytes", "text", "truncated", "hdf5", "other-architecture", "detector",
               "other-class-count", "linear-state-dict", "bare-state-dict", "model-not-a-dict", "list"]
for _kind in CHECKPOINTS:
    def _evaluate(env: Env, _kind: str = _kind) -> dict[str, str]:
        return {"ckpt": str(checkpoint_file(_kind)(env)), **base_recipe(env)}

    def _recipe(env: Env, _kind: str = _kind) -> dict[str, str]:
        raw = merge(tiny_recipe(), {"model": {"checkpoint": str(checkpoint_file(_kind)(env))}})
        return {"recipe": str(dump(env.tmp / "recipes" / "r.yaml", raw))}

    add(f"checkpoint-evaluate-{_kind}", "checkpoint", ("evaluate", "{recipe}", "--checkpoint", "{ckpt}"), _evaluate,
        ("model.pt",))
    add(f"checkpoint-model.checkpoint-{_kind}", "checkpoint", RUN, _recipe, ("model.pt",), may_write=("run",))
add("checkpoint-evaluate-no-target-val", "checkpoint", ("evaluate", "{recipe}", "--checkpoint", "{ckpt}"),
    lambda env: {"recipe": str(dump(env.tmp / "recipes" / "r.yaml", merge(tiny_recipe(), {"data": {"target_val": None}}))),
                 "ckpt": str(env.run / "checkpoints" / "round_000.pt")}, ("target_val",))


# ---------------------------------------------------------------------------------------------
# Family: pseudo-label round files, through `labels summary|show|export|diff`


def _h5(edit: Callable[[h5py.File], None]) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        with h5py.File(path, "r+") as f:
            edit(f)
    return damage


def _foreign_h5(path: Path) -> None:
    path.unlink()
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(10)
        f.attrs["creator"] = "someone else"


def _set_attr(name: str, value: Any) -> Callable[[h5py.File], None]:
    def edit(f: h5py.File) -> None:
        f.attrs[name] = value
    return edit


def _del(name: str) -> Callable[[h5py.File], None]:
    def edit(f: h5py.File) -> None:
        if name in f:
            del f[name]
        else:
            del f.attrs[name]
    return edit


def _small_labels(f: h5py.File) -> None:
    n = f["labels"].shape[0]
    del f["labels"]
    f["labels"] = np.zeros((n, 8, 8), np.uint8)


ROUND_DAMAGE: list[tuple[str, Callable[[Path], None]]] = [
    ("zero-bytes", lambda p: p.write_bytes(b"")),
    ("text", lambda p: p.write_text("not hdf5\n")),
    ("truncated", _truncate),
    ("foreign-hdf5", _foreign_h5),
    ("attr-round-7", _h5(_set_attr("round", 7))),
    ("attr-num-classes-5", _h5(_set_attr("num_classes", 5))),
    ("attr-task-detection", _h5(_set_attr("task", "detection"))),
    ("attr-format-other", _h5(_set_attr("format", "someone.else/9"))),
    ("attr-complete-removed", _h5(_del("complete"))),
    ("dataset-labels-missing", _h5(_del("labels"))),
    ("dataset-image-ids-missing", _h5(_del("image_ids"))),
    ("labels-wrong-size", _h5(_small_labels)),
]
LABELS_COMMANDS = {
    "summary": ("labels", "summary", "{run}"),
    "show": ("labels", "show", "{run}", "--round", "1", "--index", "0", "--out", "{tmp}/overlay.png"),
    "export": ("labels", "export", "{run}", "--round", "1", "--format", "png", "--out", "{tmp}/export"),
}
for _id, _damage in ROUND_DAMAGE:
    for _cmd, _argv in LABELS_COMMANDS.items():
        add(f"round-{_cmd}-{_id}", "round", _argv,
            copied_run(lambda r, _damage=_damage: _damage(r / "pseudo" / "round_001.h5")),
            ("round_001.h5",))
for _id, _damage in ROUND_DAMAGE[:6]:
    add(f"round-diff-{_id}", "round", ("labels", "diff", "{run}", "1", "2"),
        copied_run(lambda r, _damage=_damage: _damage(r / "pseudo" / "round_002.h5")), ("round_002.h5",))


# ---------------------------------------------------------------------------------------------
# Family: spatial priors, through `priors show|build` and `policy.prior`


def prior_file(kind: str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        path = tmp / "priors" / "p.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        good = np.full((10, 8, 16), 1.0 / 128, np.float32)
        if kind == "missing":
            return path
        if kind == "zero-bytes":
            path.write_bytes(b"")
        elif kind == "text":
            path.write_text("prior: yes\n")
        elif kind == "foreign":
            np.savez(path, weights=good)
        elif kind == "wrong-shape-2d":
            np.savez(path, prior=good[0])
        elif kind == "wrong-shape-4d":
            np.savez(path, prior=good[None])
        elif kind == "nan":
            np.savez(path, prior=np.where(np.arange(16) % 3 == 0, np.nan, good).astype(np.float32))
        elif kind == "inf":
            np.savez(path, prior=np.where(np.arange(16) % 5 == 0, np.inf, good).astype(np.float32))
        elif kind == "negative":
            np.savez(path, prior=-good)
        elif kind == "all-zero":
            np.savez(path, prior=np.zeros_like(good))
        elif kind == "five-classes":
            np.savez(path, prior=good[:5])
        elif kind == "strings":
            np.savez(path, prior=np.array([["a", "b"], ["c", "d"]]))
        elif kind == "pickled-object":
            np.save(path.with_suffix(".npy"), np.array([{"a": 1}], dtype=object), allow_pickle=True)
            path.with_suffix(".npy").rename(path)
        else:
            raise ValueError(kind)
        return path
    return make


PRIORS = ["missing", "zero-bytes", "text", "foreign", "wrong-shape-2d", "wrong-shape-4d", "nan", "inf", "negative",
          "all-zero", "strings", "pickled-object"]
for _kind in PRIORS:
    add(f"prior-show-{_kind}", "prior", ("priors", "show", "{prior}", "--out", "{tmp}/heat.png"),
        lambda env, _kind=_kind: {"prior": str(prior_file(_kind)(env.tmp))}, ("p.npz",))
for _kind in ["zero-bytes", "foreign", "wrong-shape-2d", "nan", "negative", "five-classes", "missing"]:
    def _sp(env: Env, _kind: str = _kind) -> dict[str, str]:
        raw = merge(tiny_recipe(), {"policy": {"name": "cbst_sp", "prior": str(prior_file(_kind)(env.tmp))}})
        return {"recipe": str(dump(env.tmp / "recipes" / "r.yaml", raw))}
    add(f"prior-policy.prior-{_kind}", "prior", RUN, _sp, ("p.npz",), may_write=("run",))
def _file(env: Env) -> dict[str, str]:
    (env.tmp / "file").write_text("a plain file\n")
    return {"file": str(env.tmp / "file")}


def _good_prior_and_file(env: Env) -> dict[str, str]:
    path = env.tmp / "priors" / "ok.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, prior=np.full((10, 8, 16), 1.0 / 128, np.float32))
    return {"prior": str(path), **_file(env)}


add("prior-show-out-under-file", "prior", ("priors", "show", "{prior}", "--out", "{file}/heat.png"),
    _good_prior_and_file, ("/file",))
add("prior-show-class-names-count", "prior", ("priors", "show", "{prior}", "--out", "{tmp}/h.png", "--class-names",
                                              "a,b"), _good_prior_and_file, ("class",))


def _prior_build_recipe(env: Env) -> dict[str, str]:
    return {**base_recipe(env), **_file(env)}


BUILD = ("priors", "build", "--dataset", "{recipe}", "--out", "{tmp}/priors/new.npz")
for _id, _extra, _contains in [
    ("size-abc", ("--size", "abc"), ("abc",)), ("size-0x0", ("--size", "0x0"), ("0x0",)),
    ("size-negative", ("--size", "-4x8"), ("-4x8",)), ("size-3d", ("--size", "4x4x4"), ("4x4x4",)),
    ("ksize-0", ("--ksize", "0"), ("ksize",)), ("ksize-negative", ("--ksize", "-3"), ("ksize",)),
]:
    add(f"prior-build-{_id}", "prior", (*BUILD, *_extra), _prior_build_recipe, _contains)
add("prior-build-out-under-file", "prior", ("priors", "build", "--dataset", "{recipe}", "--out", "{file}/p.npz"),
    _prior_build_recipe, ("/file",))
add("prior-build-unknown-dataset", "prior", ("priors", "build", "--dataset", "no_such_set", "--out", "{tmp}/p.npz"),
    nothing, ("no_such_set",))
add("prior-build-missing-root", "prior", ("priors", "build", "--dataset", "gta5", "--root", "{tmp}/none",
                                          "--num-classes", "19", "--out", "{tmp}/p.npz"), nothing, ("none",))
add("prior-build-no-root", "prior", ("priors", "build", "--dataset", "gta5", "--num-classes", "19", "--out",
                                     "{tmp}/p.npz"), nothing, ("root",))
add("prior-build-num-classes-0", "prior", ("priors", "build", "--dataset", "synth_street", "--split", "source",
                                           "--num-classes", "0", "--out", "{tmp}/p.npz"), nothing, ("classes",))
add("prior-build-option-malformed", "prior", ("priors", "build", "--dataset", "synth_street", "--split", "source",
                                              "--num-classes", "10", "--option", "num_images", "--out", "{tmp}/p.npz"),
    nothing, ("num_images",))
add("prior-build-option-unknown", "prior", ("priors", "build", "--dataset", "synth_street", "--split", "source",
                                            "--num-classes", "10", "--option", "bogus=1", "--out", "{tmp}/p.npz"),
    nothing, ("bogus",))
add("prior-build-recipe-missing-root", "prior", BUILD,
    seg_data(remove("gta5")), ("gta5",))


# ---------------------------------------------------------------------------------------------
# Family: every command with bad options and arguments


def _run_and_file(env: Env) -> dict[str, str]:
    return {**copied_run()(env), **_file(env)}


def _foreign_folder(env: Env) -> dict[str, str]:
    (env.tmp / "folder").mkdir()
    (env.tmp / "folder" / "keep.txt").write_text("mine\n")
    return {**copied_run()(env), "folder": str(env.tmp / "folder")}


# Where `data synth` accepts the value it writes this many images only.
SMALL = ("--num-source", "2", "--num-target-train", "2", "--num-target-val", "2")
CLI: list[tuple[str, tuple[str, ...], Setup, tuple[str, ...], tuple[str, ...]]] = [
    ("demo-seeds-letters", ("demo", "--out", "{tmp}/demo", "--seeds", "a,b"), nothing, ("seeds",), ("demo",)),
    ("demo-seeds-mixed", ("demo", "--out", "{tmp}/demo", "--seeds", "1,,x"), nothing, ("seeds",), ("demo",)),
    ("demo-seeds-huge", ("demo", "--out", "{tmp}/demo", "--seeds", str(2**70)), nothing, ("seed",), ("demo",)),
    ("demo-seeds-empty", ("demo", "--out", "{tmp}/demo", "--seeds", ","), nothing, ("seeds",), ("demo",)),
    ("demo-recipes-missing", ("demo", "--out", "{tmp}/demo", "--recipes", "{tmp}/none"), nothing, ("none",), ("demo",)),
    ("demo-out-file", ("demo", "--out", "{file}"), _file, ("file",), ()),
    ("demo-task-unknown", ("demo", "--out", "{tmp}/demo", "--task", "classification"), nothing, ("task",), ()),
    ("synth-out-file", ("data", "synth", "--out", "{file}", *SMALL), _file, ("file",), ()),
    ("synth-out-under-file", ("data", "synth", "--out", "{file}/x", *SMALL), _file, ("file",), ()),
    ("synth-num-source-negative", ("data", "synth", "--out", "{tmp}/s", *SMALL, "--num-source", "-1"), nothing,
     ("source",), ()),
    ("synth-num-target-val-negative", ("data", "synth", "--out", "{tmp}/s", *SMALL, "--num-target-val", "-4"), nothing,
     ("target",), ()),
    ("synth-height-0", ("data", "synth", "--out", "{tmp}/s", *SMALL, "--height", "0"), nothing, ("height",), ()),
    ("synth-width-negative", ("data", "synth", "--out", "{tmp}/s", *SMALL, "--width", "-3"), nothing, ("width",), ()),
    ("synth-height-letters", ("data", "synth", "--out", "{tmp}/s", *SMALL, "--height", "tall"), nothing, ("height",), ()),
    ("synth-seed-negative", ("data", "synth", "--out", "{tmp}/s", "--seed", "-1", *SMALL), nothing,
     ("seed",), ()),
    ("synth-det-height-0", ("data", "synth", "--task", "detection", "--out", "{tmp}/s", *SMALL, "--height", "0"), nothing,
     ("height",), ()),
    ("check-unknown-recipe", ("data", "check", "no_such_recipe"), nothing, ("no_such_recipe",), ()),
    ("check-missing-recipe-file", ("data", "check", "{tmp}/absent.yaml"), nothing, ("absent.yaml",), ()),
    ("check-limit-0", ("data", "check", "{recipe}", "--limit", "0"), base_recipe, ("limit",), ()),
    ("cp-unknown", ("recipes", "cp", "no_such_recipe", "{tmp}/x.yaml"), nothing, ("no_such_recipe",), ()),
    ("cp-existing-file", ("recipes", "cp", "synth_st", "{file}"), _file, ("file",), ()),
    ("cp-under-file", ("recipes", "cp", "synth_st", "{file}/x.yaml"), _file, ("file",), ()),
    ("cp-missing-path", ("recipes", "cp", "synth_st"), nothing, ("PATH",), ()),
    ("summary-missing-run", ("labels", "summary", "{tmp}/none"), nothing, ("none",), ()),
    ("summary-empty-folder", ("labels", "summary", "{folder}"), _foreign_folder, ("folder",), ()),
    ("summary-on-file", ("labels", "summary", "{file}"), _file, ("file",), ()),
    ("show-round-9", ("labels", "show", "{run}", "--round", "9", "--index", "0", "--out", "{tmp}/o.png"),
     copied_run(), ("9",), ()),
    ("show-round-negative", ("labels", "show", "{run}", "--round", "-1", "--index", "0", "--out", "{tmp}/o.png"),
     copied_run(), ("-1",), ()),
    ("show-round-0", ("labels", "show", "{run}", "--round", "0", "--index", "0", "--out", "{tmp}/o.png"),
     copied_run(), ("round",), ()),
    ("show-index-negative", ("labels", "show", "{run}", "--round", "1", "--index", "-1", "--out", "{tmp}/o.png"),
     copied_run(), ("-1",), ()),
    ("show-index-999", ("labels", "show", "{run}", "--round", "1", "--index", "999", "--out", "{tmp}/o.png"),
     copied_run(), ("999",), ()),
    ("show-image-unknown", ("labels", "show", "{run}", "--round", "1", "--image", "nobody", "--out", "{tmp}/o.png"),
     copied_run(), ("nobody",), ()),
    ("show-image-and-index", ("labels", "show", "{run}", "--round", "1", "--image", "x", "--index", "0", "--out",
                              "{tmp}/o.png"), copied_run(), ("--index",), ()),
    ("show-grid-0", ("labels", "show", "{run}", "--round", "1", "--grid", "0", "--out", "{tmp}/o.png"), copied_run(),
     ("grid",), ()),
    ("show-grid-negative", ("labels", "show", "{run}", "--round", "1", "--grid", "-2", "--out", "{tmp}/o.png"),
     copied_run(), ("grid",), ()),
    ("show-out-under-file", ("labels", "show", "{run}", "--round", "1", "--index", "0", "--out", "{file}/o.png"),
     _run_and_file, ("/file",), ()),
    ("show-out-is-folder", ("labels", "show", "{run}", "--round", "1", "--index", "0", "--out", "{tmp}"),
     copied_run(), ("out",), ()),
    ("show-missing-round", ("labels", "show", "{run}", "--index", "0", "--out", "{tmp}/o.png"), copied_run(),
     ("round",), ()),
    ("diff-round-9", ("labels", "diff", "{run}", "1", "9"), copied_run(), ("9",), ()),
    ("diff-round-negative", ("labels", "diff", "{run}", "-1", "1"), copied_run(), ("-1",), ()),
    ("diff-letters", ("labels", "diff", "{run}", "a", "b"), copied_run(), ("a",), ()),
    ("diff-missing-run", ("labels", "diff", "{tmp}/none", "1", "2"), nothing, ("none",), ()),
    ("export-format-unknown", ("labels", "export", "{run}", "--round", "1", "--format", "tiff", "--out",
                               "{tmp}/e"), copied_run(), ("tiff",), ()),
    ("export-format-wrong-task", ("labels", "export", "{run}", "--round", "1", "--format", "voc", "--out",
                                  "{tmp}/e"), copied_run(), ("voc",), ()),
    ("export-images-unknown", ("labels", "export", "{run}", "--round", "1", "--format", "png", "--images", "paint",
                               "--out", "{tmp}/e"), copied_run(), ("paint",), ()),
    ("export-out-file", ("labels", "export", "{run}", "--round", "1", "--format", "png", "--out", "{file}"),
     _run_and_file, ("file",), ()),
    ("export-out-foreign-folder", ("labels", "export", "{run}", "--round", "1", "--format", "png", "--out",
                                   "{folder}"), _foreign_folder, ("folder",), ()),
    ("export-out-foreign-folder-overwrite", ("labels", "export", "{run}", "--round", "1", "--format", "png", "--out",
                                             "{folder}", "--overwrite"), _foreign_folder, ("folder",), ()),
    ("export-round-9", ("labels", "export", "{run}", "--round", "9", "--format", "png", "--out", "{tmp}/e"),
     copied_run(), ("9",), ()),
    ("export-split-escapes", ("labels", "export", "{run}", "--round", "1", "--format", "cityscapes", "--split",
                              "../../x", "--out", "{tmp}/e"), copied_run(), ("split",), ()),
    ("evaluate-missing-checkpoint-option", ("evaluate", "{recipe}"), base_recipe, ("checkpoint",), ()),
    ("evaluate-unknown-recipe", ("evaluate", "no_such_recipe", "--checkpoint", "{tmp}/x.pt"), nothing,
     ("no_such_recipe",), ()),
    ("list-unknown", ("list", "models"), nothing, ("models",), ()),
    ("unknown-command", ("train",), nothing, ("train",), ()),
    ("run-missing-recipe-argument", ("run",), nothing, ("RECIPE",), ()),
    ("run-set-without-value", ("run", "{recipe}", "--out", "{tmp}/run", "--set"), base_recipe, ("--set",), ()),
    ("run-unknown-option", ("run", "{recipe}", "--out", "{tmp}/run", "--fast"), base_recipe, ("--fast",), ()),
]
for _id, _argv, _setup, _contains, _may in CLI:
    add(f"cli-{_id}", "cli", _argv, _setup, _contains, may_write=_may)
