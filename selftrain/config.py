"""Recipe schema and loading: YAML, ``extends:`` chains, ``--set a.b=c`` overrides, strict checks.

A recipe is a mapping validated against the dataclasses below. Unknown keys, wrong types and
out-of-range values are errors that name the key path, the value and the valid keys or range;
numeric fields carry their valid range as a :class:`Bound` (field metadata ``bound``), checked as
the value enters. Defaults follow the CBST paper and its official code; ``recipes/defaults.yaml``
holds the embedded synthetic benchmark that the demo recipes extend.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, also reading ``1e-3``, ``1E6`` and ``+2e5`` as floats (YAML 1.2 does;
    YAML 1.1, which PyYAML follows, wants a dot), so free-form options such as a policy's
    ``threshold: 1e-3`` are numbers as the user meant them."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def yaml_load(text: str) -> Any:
    """A recipe's YAML (or one ``--set`` value) read with :class:`_Loader`."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)

SEED_MAX = 2**63 - 1  # torch.manual_seed and numpy take seeds in [0, 2**63 - 1]
INT_MAX = 2**63 - 1  # no count, size or index of a recipe goes past a 64-bit integer
LABEL_MAX = 255  # pseudo-labels and label maps are uint8; 255 is the usual ignore value


@dataclass(frozen=True)
class Bound:
    """The valid values of a numeric recipe key: finite, above ``low`` and below ``high`` (strictly
    where ``low_open`` / ``high_open``). ``example`` and ``note`` complete the fix in the message."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    example: str = ""
    note: str = ""

    def holds(self, value: float) -> bool:
        """``value`` is finite and inside the range."""
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if isinstance(value, int) and abs(value) > INT_MAX:
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        """The range in words: ``positive``, ``>= 1``, ``in [0, 1)``, ``finite``."""
        low, high = self.low, self.high
        if low is not None and high is not None:
            return f"in {'(' if self.low_open else '['}{_number(low)}, {_number(high)}{')' if self.high_open else ']'}"
        if low == 0 and self.low_open:
            return "positive"
        if low is not None:
            return f"{'>' if self.low_open else '>='} {_number(low)}"
        if high is not None:
            return f"{'<' if self.high_open else '<='} {_number(high)}"
        return "finite"

    def error(self, path: str, value: float) -> ConfigError:
        """``<path> must be <range>, got <value>; give <kind> <range>, e.g. <example><note>``."""
        words = self.describe()
        kind = "an integer" if isinstance(value, int) else "a number" if words.startswith("in ") else "a finite number"
        wanted = kind if words == "finite" else f"{kind} {'> 0' if words == 'positive' else words}"
        if isinstance(value, float) and not math.isfinite(value):
            words = "a finite number"
        if isinstance(value, int) and abs(value) > INT_MAX:
            words = f"{words} and at most 2**63 - 1"
        example = f", e.g. {self.example}" if self.example else ""
        return ConfigError(f"{path} must be {words}, got {_show(value)}; give {wanted}{example}{self.note}")


def bounded(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, gt: float | None = None,
            ge: float | None = None, lt: float | None = None, le: float | None = None, example: str = "",
            note: str = "") -> Any:
    """A dataclass field whose value (each element, for a list; None passes) must lie in the range."""
    bound = Bound(low=gt if gt is not None else ge, high=lt if lt is not None else le, low_open=gt is not None,
                  high_open=lt is not None, example=example, note=note)
    return field(default=default, default_factory=factory, metadata={"bound": bound})


@dataclass
class DatasetSpec:
    """One data set: a registry ``name``, an optional ``root`` and constructor ``options``."""

    name: str = "synth_street"
    root: str | None = None
    split: str = ""
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    num_classes: int = bounded(19, ge=1, example="19")
    class_names: list[str] | None = None
    ignore_index: int = bounded(255, ge=0, le=LABEL_MAX, example="255")
    source: DatasetSpec = field(default_factory=DatasetSpec)
    target: DatasetSpec = field(default_factory=lambda: DatasetSpec(split="target_train"))
    target_val: DatasetSpec | None = None
    num_workers: int = bounded(0, ge=0, example="4", note=" (0: load in the main process)")


@dataclass
class ModelConfig:
    """A registered adapter and its options; ``checkpoint`` starts from a saved run instead of round 0."""

    name: str = "smp_deeplabv3plus"
    options: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None


@dataclass
class OptimConfig:
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = bounded(1e-4, gt=0, example="1e-4")
    # Momentum of SGD (ignored by adam / adamw, which take their betas).
    momentum: float = bounded(0.9, ge=0, lt=1, example="0.9")
    weight_decay: float = bounded(5e-4, ge=0, example="5e-4")
    # Learning rate of the model's head (classifier) relative to the rest: 10 for DeepLab-v2's ASPP.
    head_lr_mult: float = bounded(1.0, gt=0, example="10", note=" (1: the head trains at the same learning rate)")
    # Cap on the global gradient norm (null: no clipping).
    clip_grad_norm: float | None = bounded(None, gt=0, example="10", note=", or null for no clipping")
    # Micro-batches per optimiser step: the effective batch is batch size x accumulate; steps count
    # optimiser steps, so a step draws `accumulate` batches.
    accumulate: int = bounded(1, ge=1, example="2", note=" (1: no gradient accumulation)")
    # Stop the phase (exit 1, the round not checkpointed) when a loss component passes this many times
    # its running level, the median of its last 50 values but at least 1: healthy losses stay far
    # below, a diverging run passes it within steps (null: stop on non-finite losses only).
    divergence_factor: float | None = bounded(1000.0, gt=1, example="1000",
                                              note=", or null to stop on non-finite losses only")


@dataclass
class SourceTrainingConfig:
    """Round 0: supervised training on the source domain ("source only")."""

    enabled: bool = True
    steps: int = bounded(1000, ge=0, example="1000")
    batch_size: int = bounded(2, ge=1, example="2")
    lr_schedule: Literal["constant", "onecycle", "poly", "step"] = "poly"
    # lr_schedule step: the steps at which the learning rate is multiplied by lr_gamma (null: 2/3 and
    # 5/6 of the steps); the Faster R-CNN papers drop once at 50000 of 70000 steps.
    lr_milestones: list[int] | None = bounded(None, ge=1, example="50000",
                                              note=", or null for 2/3 and 5/6 of the steps")
    lr_gamma: float = bounded(0.1, gt=0, le=1, example="0.1")
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class Ramp:
    """A value that starts at ``start`` and grows by ``step`` per round up to ``max``; every round's
    value is checked against the range of what the ramp sets (see :func:`_check_ramp`)."""

    start: float = bounded(example="0.2")
    step: float = bounded(example="0.05")
    max: float = bounded(example="0.5")

    def at(self, round_index: int) -> float:
        """Value for 1-based round ``round_index``."""
        return min(self.start + self.step * (round_index - 1), self.max)


@dataclass
class MiningConfig:
    """Rare-class hard-sample mining (CBST §5): crops centred on pixels of rare predicted classes."""

    enabled: bool = False
    rare_share: float = bounded(1e-3, ge=0, le=1, example="1e-3")
    probability: float = bounded(0.5, ge=0, le=1, example="0.5")


@dataclass
class PolicyConfig:
    name: str = "cbst"
    prior: str | None = None
    mining: MiningConfig = field(default_factory=MiningConfig)
    # Keyword options of the policy constructor, e.g. {threshold: 0.8, negatives: weak} for wst.
    options: dict[str, Any] = field(default_factory=dict)
    # Test-time views for pseudo-label generation (the paper: scales 0.5, 0.75, 1.0 with flip).
    scales: list[float] = bounded(factory=lambda: [1.0], gt=0, example="0.75")
    flip: bool = False


@dataclass
class RoundsConfig:
    """The self-training schedule (CBST §5 and appendix; official code for the source share)."""

    # Every round writes a pseudo-label file and a checkpoint; 1000 is far past any schedule in use.
    count: int = bounded(3, ge=0, le=1000, example="3", note=" (0: source training only)")
    portion: Ramp = field(default_factory=lambda: Ramp(0.2, 0.05, 0.5))
    source_share: Ramp = field(default_factory=lambda: Ramp(0.03, 0.0025, 0.06))
    target_epochs: float = bounded(2.0, gt=0, example="2")
    steps: int | None = bounded(None, ge=1, example="1000", note=", or null to derive them from rounds.target_epochs")
    batch_source: int = bounded(1, ge=0, example="1", note=" (0: target images only)")
    batch_target: int = bounded(1, ge=1, example="1")
    lr_decay: Literal["constant", "sqrt2"] = "constant"
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class AugmentConfig:
    flip: bool = True
    crop: list[int] | None = bounded(None, ge=1, example="512")
    scale: list[float] | None = bounded(None, gt=0, example="0.7")
    # detection: SSD's photometric distortion (brightness, contrast, saturation, hue) on training images
    photometric: bool = False


@dataclass
class EvalConfig:
    batch_size: int = bounded(8, ge=1, example="8")
    every_round: bool = True
    scales: list[float] = bounded(factory=lambda: [1.0], gt=0, example="0.75")
    flip: bool = False
    use_07: bool = False  # detection: VOC07 11-point AP instead of all-point


@dataclass
class LossConfig:
    """An extra loss term (``selftrain list losses``): added to the task losses times ``weight`` in
    the ``phases`` it names ("source": round 0, "rounds": the self-training rounds)."""

    name: str
    weight: float = bounded(1.0, ge=0, example="1e-3")
    phases: list[Literal["source", "rounds"]] = field(default_factory=lambda: ["source", "rounds"])
    # Late launch: the fraction of the phase's steps (of all rounds' steps in the rounds) before the
    # term acts; 0: from the first step (iFAN starts its instance terms at 0.43 and 0.71).
    start: float = bounded(0.0, ge=0, le=1, example="0.43")
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckpointConfig:
    """Step checkpoints: the round being trained can be resumed at the step after the newest one.
    ``every_steps`` null: only round checkpoints (plus one after an offline round's pseudo-labels)."""

    every_steps: int | None = bounded(None, ge=1, example="500", note=", or null for round checkpoints only")


@dataclass
class RunConfig:
    # The default run folder is runs/<name>: a file name, never a path.
    name: str = "run"
    seed: int = bounded(0, ge=0, le=SEED_MAX, example="0")
    # cpu, cuda, cuda:<index>, or auto (cuda when a GPU is visible, else cpu).
    device: str = "cpu"
    # Forward passes (training, evaluation, pseudo-labels) in fp32, or autocast to bf16 / fp16
    # (fp16 with a GradScaler); losses and pseudo-label statistics stay float32.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    task: Literal["segmentation", "detection"] = "segmentation"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    source_training: SourceTrainingConfig = field(default_factory=SourceTrainingConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    rounds: RoundsConfig = field(default_factory=RoundsConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pseudo_batch_size: int = bounded(8, ge=1, example="8")
    losses: list[LossConfig] = field(default_factory=list)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


def _number(x: float) -> str:
    return str(x) if isinstance(x, int) else format(x, "g")


# ---------------------------------------------------------------------------------------------
# Loading


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a recipe (following ``extends:``), apply ``key.path=value`` overrides, validate."""
    raw = read_chain(path)
    for item in overrides:
        key, value = parse_override(item)
        _set_path(raw, key, value)
    cfg = from_dict(RunConfig, raw, "")
    _check_values(cfg)
    return cfg


def read_chain(path: str | Path) -> dict[str, Any]:
    """The recipe's keys with its ``extends:`` chain merged in (no overrides, not validated)."""
    return _read_chain(Path(path), seen=())


def _read_chain(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    try:
        exists = path.is_file()
    except OSError:  # a name too long for the file system, for one
        exists = False
    if not exists:
        raise ConfigError(f"recipe {str(path)!r} does not exist; pass the path of a YAML recipe "
                          "(see recipes/README.md)")
    if path.resolve() in seen:
        raise ConfigError(f"recipe {path} extends itself through {' -> '.join(map(str, seen))}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"recipe {path} cannot be read as UTF-8 text ({type(exc).__name__}); "
                          "pass a YAML recipe") from None
    try:
        data = yaml_load(text)
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: a date or an integer PyYAML cannot build
        raise ConfigError(f"recipe {path} is not valid YAML: {_first_line(exc)}") from None
    if data is None:
        raise ConfigError(f"recipe {path} is empty; write the keys that differ from a built-in recipe under "
                          "'extends: <its path>' (see `selftrain recipes cp`)")
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of keys, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent.strip():
        raise ConfigError(f"recipe {path}: extends must be the path of one recipe, got {_show(parent)}; "
                          "e.g. extends: defaults.yaml")
    file = path.parent / parent
    if not file.is_file():
        raise ConfigError(f"recipe {path} extends {_show(parent)}, which is not a recipe file ({file}); "
                          "give a path relative to the recipe's folder")
    base = _read_chain(file, seen + (path.resolve(),))
    return deep_merge(base, data)


def deep_merge(base: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    """``delta`` over ``base``; nested mappings merge, everything else replaces.

    A mapping whose ``name`` changes (another model, data set or policy) replaces the base
    mapping whole, so options of the old registry entry do not leak into the new one; a base
    mapping without a ``name`` is a partial (shared settings) and merges.
    """
    out = dict(base)
    for key, value in delta.items():
        old = out.get(key)
        renamed = (isinstance(old, dict) and isinstance(value, dict) and "name" in value and "name" in old
                   and value["name"] != old["name"])
        if isinstance(value, dict) and isinstance(old, dict) and not renamed:
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


_KEY_PATH = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")


def parse_override(item: str) -> tuple[str, Any]:
    """``key.path=value`` -> (key path, value read as YAML; text that is not YAML stays text)."""
    if "=" not in item:
        raise ConfigError(f"override {_show(item)} must look like key.path=value, e.g. rounds.count=2")
    key, text = item.split("=", 1)
    if not _KEY_PATH.fullmatch(key.strip()):
        raise ConfigError(f"override {_show(item)} has no key path before '='; write key.path=value with "
                          "dot-separated keys, e.g. rounds.optim.lr=1e-4")
    try:
        value = yaml_load(text)
    except (yaml.YAMLError, ValueError):
        value = text
    return key.strip(), value


def _set_path(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {_show(key)}: {_show(part)} is not a mapping; "
                              "override the whole value or a key under a mapping")
        node = child
    node[parts[-1]] = value


# ---------------------------------------------------------------------------------------------
# Strict conversion


def from_dict(cls: type, data: Any, path: str) -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys, wrong types and values outside a
    field's :class:`Bound` raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'recipe'} must be a mapping, got {type(data).__name__}; write {{key: value, ...}}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted((k for k in data if k not in fields), key=str)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown recipe key {where}{_show_key(unknown[0])}; "
                          f"valid keys{' under ' + path if path else ''}: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        value = _with_defaults(fields[name], value)
        where = f"{path}.{name}" if path else name
        kwargs[name] = _convert(hints[name], value, where)
        bound = fields[name].metadata.get("bound")
        if bound is not None:
            _check_bound(bound, kwargs[name], where)
    missing = [n for n, f in fields.items() if n not in kwargs and _has_no_default(f)]
    if missing:
        raise ConfigError(f"recipe key {path}.{missing[0]} is required; add it")
    return cls(**kwargs)


def _check_bound(bound: Bound, value: Any, path: str) -> None:
    """``value`` (each element of a list; None passes) within ``bound``."""
    if value is None:
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            _check_bound(bound, v, f"{path}[{i}]")
    elif not bound.holds(value):
        raise bound.error(path, value)


def _with_defaults(f: dataclasses.Field, value: Any) -> Any:
    """A partial mapping for a nested section keeps that section's defaults for the keys it omits."""
    if not isinstance(value, dict) or f.default_factory is dataclasses.MISSING:
        return value
    default = f.default_factory()
    return deep_merge(dataclasses.asdict(default), value) if dataclasses.is_dataclass(default) else value


def _has_no_default(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        return _convert(options[0], value, path)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"recipe key {path} is {_show(value)}; choose one of: {', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise _type_error(path, "a list", value)
        return [_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(path, "a mapping", value)
        key = next((k for k in value if not isinstance(k, str)), None)
        if key is not None:
            raise ConfigError(f"recipe key {path} has the key {_show(key)} ({type(key).__name__}); "
                              "option names are strings")
        return dict(value)
    return _scalar(tp, value, path)


# The ways a user writes a number: YAML 1.1 reads only forms with a dot and a signed exponent as
# floats, so 1e-3, 1E6 and +1e6 arrive as text; nan / inf pass here and meet the field's range.
_FLOAT_TEXT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?(?:inf|infinity|nan)",
                         re.IGNORECASE)


def parse_float(value: Any) -> float | None:
    """``value`` as a float when it is a number or a number's text (``1e-3``, ``.5``), else None."""
    if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:  # an integer beyond the float range
        return math.inf if value > 0 else -math.inf


def _scalar(tp: Any, value: Any, path: str) -> Any:
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _type_error(path, "true or false", value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(path, "an integer", value)
        return value
    if tp is float:
        number = parse_float(value)
        if number is None:
            raise _type_error(path, "a number", value)
        return number
    if tp is str:
        if not isinstance(value, str):
            raise _type_error(path, "a string", value)
        return value
    raise TypeError(f"unsupported schema type {tp} at {path}")


# How to write a value of each kind in YAML, the fix of a type error.
_WRITE = {"an integer": "write digits, e.g. 8", "a number": "write e.g. 0.5, 2 or 1e-3",
          "true or false": "write true or false", "a string": "quote it, e.g. '1'",
          "a list": "write [a, b, ...]", "a mapping": "write {key: value, ...}"}


def _type_error(path: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"recipe key {path} must be {expected}, got {_show(value)} ({type(value).__name__}); "
                       f"{_WRITE[expected]}")


def _show(value: Any, limit: int = 60) -> str:
    """``repr(value)`` on one line, cut to about ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _first_line(exc: Exception) -> str:
    lines = str(exc).splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def _show_key(key: Any) -> str:
    """A mapping key as typed when it is a plain word, else its short repr."""
    return key if isinstance(key, str) and key.isprintable() and key.strip() == key and key else _show(key)


# ---------------------------------------------------------------------------------------------
# Checks across keys


# The default run folder is runs/<name>: a name must stay one plain folder name.
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")
_DEVICE = re.compile(r"cpu|auto|cuda(?::[0-9]+)?")
# Data set options with one meaning in every data set that takes them (the synthetic benchmarks);
# zero images is left to the data check, which names the empty split.
_DATASET_OPTIONS = {"num_images": Bound(low=0, example="400"), "height": Bound(low=1, high=8192, example="64"),
                    "width": Bound(low=1, high=8192, example="128"), "seed": Bound(low=0, high=SEED_MAX, example="0")}
# A loss term's own optimiser (``options.optim``) takes the phases' ranges, and Adam's betas.
_LOSS_OPTIM = {f.name: f.metadata["bound"] for f in dataclasses.fields(OptimConfig)
               if f.name in ("lr", "momentum", "weight_decay")}
_BETA = Bound(low=0, high=1, high_open=True, example="0.9")
_LOSS_SCHEDULES = ("constant", "follow")


def _check_values(cfg: RunConfig) -> None:
    """What one field's type and range cannot say: names, devices, keys that depend on each
    other, the per-round schedule, data set and loss-term options."""
    if not _NAME.fullmatch(cfg.name):
        raise ConfigError(f"name {_show(cfg.name)} cannot name the run folder runs/<name>; use 1 to 200 "
                          "letters a-z A-Z, digits, '.', '_' and '-', not starting with '.'")
    if not _DEVICE.fullmatch(cfg.device):
        raise ConfigError(f"device {_show(cfg.device)} is unknown; set device: cpu, cuda, cuda:<index> or auto")
    _check_data(cfg)
    _check_ramp(cfg.rounds.portion, cfg.rounds.count, "portion", low_open=True)
    _check_ramp(cfg.rounds.source_share, cfg.rounds.count, "source_share", low_open=False)
    _check_views(cfg)
    _check_milestones(cfg.source_training)
    for i, spec in enumerate(cfg.losses):
        if not spec.phases:
            raise ConfigError(f"losses[{i}].phases is empty; list source, rounds or both")
        _check_loss_optim(spec, f"losses[{i}].options.optim")


def _check_data(cfg: RunConfig) -> None:
    """Class count, names and ignore index together; data set options."""
    d, task = cfg.data, cfg.task
    least = 1 if task == "detection" else 2
    if d.num_classes < least:
        raise ConfigError(f"data.num_classes must be >= {least} for {task}, got {d.num_classes}; give the "
                          + ("number of object classes (background not counted)" if task == "detection"
                             else "number of classes, e.g. 19"))
    if d.class_names is not None and len(d.class_names) != d.num_classes:
        raise ConfigError(f"data.class_names lists {len(d.class_names)} names but data.num_classes is "
                          f"{d.num_classes}; list data.num_classes names or set data.num_classes: {len(d.class_names)}")
    twice = next((n for i, n in enumerate(d.class_names or []) if n in d.class_names[:i]), None)
    if twice is not None:
        raise ConfigError(f"data.class_names names {_show(twice)} twice; give every class its own name")
    if task == "segmentation" and d.num_classes > LABEL_MAX:
        raise ConfigError(f"data.num_classes must be <= {LABEL_MAX} for segmentation, got {d.num_classes}; label "
                          "maps are uint8 with one value left for data.ignore_index")
    if task == "segmentation" and d.ignore_index < d.num_classes:
        raise ConfigError(f"data.ignore_index = {d.ignore_index} is a class (data.num_classes is {d.num_classes}: "
                          f"classes 0..{d.num_classes - 1}); set data.ignore_index: 255 (or {d.num_classes}..255)")
    for key, spec in (("source", d.source), ("target", d.target), ("target_val", d.target_val)):
        for option, bound in _DATASET_OPTIONS.items():
            if spec is None or option not in spec.options:
                continue
            where, value = f"data.{key}.options.{option}", spec.options[option]
            if isinstance(value, bool) or not isinstance(value, int):
                raise _type_error(where, "an integer", value)
            _check_bound(bound, value, where)


def _check_ramp(ramp: Ramp, count: int, key: str, *, low_open: bool) -> None:
    """Every round's value of ``ramp`` in (0, 1] (``low_open``) or [0, 1], naming the first round outside."""
    bound = Bound(low=0, high=1, low_open=low_open)
    interval, what = ("(0, 1]" if low_open else "[0, 1]"), key.replace("_", " ")
    bad = next((r for r in range(1, count + 1) if not bound.holds(ramp.at(r))), None)
    if bad is None:
        for end in ("start", "max"):  # a start or cap outside the range is a typo even where min() hides it
            if count and not bound.holds(getattr(ramp, end)):
                raise ConfigError(f"rounds.{key}.{end} is {getattr(ramp, end):g}, outside {interval}; give a "
                                  f"{what} in {interval}, e.g. {0.2 if low_open else 0.03}")
        return
    raise ConfigError(f"rounds.{key} gives round {bad} a {what} of {ramp.at(bad):g}, outside {interval}; set "
                      f"rounds.{key}.start, .step and .max so that min(start + step * (round - 1), max) stays in "
                      f"{interval} for rounds 1 to {count}")


def _check_views(cfg: RunConfig) -> None:
    """Crop and scale pairs, non-empty test-time scales."""
    a = cfg.augment
    if a.crop is not None and len(a.crop) != 2:
        raise ConfigError(f"augment.crop must be [height, width], got {_show(a.crop)}; e.g. crop: [512, 1024], "
                          "or null for whole images")
    if a.scale is not None and (len(a.scale) != 2 or a.crop is None):
        raise ConfigError("augment.scale must be [low, high] and needs augment.crop (batches need one size); "
                          "e.g. scale: [0.7, 1.3] with crop: [512, 1024]")
    if a.scale is not None and a.scale[0] > a.scale[1]:
        raise ConfigError(f"augment.scale is {_show(a.scale)}, low above high; give [low, high], e.g. [0.7, 1.3]")
    for key, scales in (("eval.scales", cfg.eval.scales), ("policy.scales", cfg.policy.scales)):
        if not scales:
            raise ConfigError(f"{key} is empty; list at least one scale, e.g. [1.0] or [0.5, 0.75, 1.0]")


def _check_milestones(st: SourceTrainingConfig) -> None:
    """Milestones only with the step schedule, strictly increasing."""
    m = st.lr_milestones
    if m is None:
        return
    if st.lr_schedule != "step":
        raise ConfigError(f"source_training.lr_milestones needs lr_schedule: step (it is {st.lr_schedule}); set "
                          "source_training.lr_schedule: step or remove lr_milestones")
    if not m or any(b <= a for a, b in zip(m, m[1:])):
        raise ConfigError(f"source_training.lr_milestones must be increasing steps, got {_show(m)}; e.g. [50000]")


def _check_loss_optim(spec: LossConfig, path: str) -> None:
    """A loss term's ``options.optim``: numbers read as the schema reads floats and checked against
    the phases' ranges; other keys are the term's to check."""
    optim = spec.options.get("optim")
    if optim is None:
        return
    if not isinstance(optim, dict):
        raise _type_error(path, "a mapping", optim)
    out = dict(optim)
    for key, bound in _LOSS_OPTIM.items():
        if key in out:
            out[key] = _scalar(float, out[key], f"{path}.{key}")
            _check_bound(bound, out[key], f"{path}.{key}")
    if "betas" in out:
        betas = _convert(list[float], out["betas"], f"{path}.betas")
        if len(betas) != 2:
            raise ConfigError(f"{path}.betas must be [beta1, beta2], got {_show(betas)}; e.g. [0.9, 0.999]")
        _check_bound(_BETA, betas, f"{path}.betas")
        out["betas"] = betas
    if "schedule" in out and out["schedule"] not in _LOSS_SCHEDULES:
        raise ConfigError(f"{path}.schedule is {_show(out['schedule'])}; choose one of: {', '.join(_LOSS_SCHEDULES)} "
                          "(constant: the optimiser's lr throughout; follow: scaled as the phase's lr)")
    spec.options["optim"] = out


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: RunConfig) -> str:
    """The resolved recipe as YAML (saved with every run and inside every checkpoint)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
