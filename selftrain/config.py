"""Recipe schema and loading: YAML, ``extends:`` chains, ``--set a.b=c`` overrides, strict checks.

A recipe is a mapping validated against the dataclasses below. Unknown keys and wrong types are
errors that name the key path and the valid keys. Defaults follow the CBST paper and its official
code; ``recipes/defaults.yaml`` holds the embedded synthetic benchmark that the demo recipes extend.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError


@dataclass
class DatasetSpec:
    """One data set: a registry ``name``, an optional ``root`` and constructor ``options``."""

    name: str = "synth_street"
    root: str | None = None
    split: str = ""
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    num_classes: int = 19
    class_names: list[str] | None = None
    ignore_index: int = 255
    source: DatasetSpec = field(default_factory=DatasetSpec)
    target: DatasetSpec = field(default_factory=lambda: DatasetSpec(split="target_train"))
    target_val: DatasetSpec | None = None
    num_workers: int = 0


@dataclass
class ModelConfig:
    """A registered adapter and its options; ``checkpoint`` starts from a saved run instead of round 0."""

    name: str = "smp_deeplabv3plus"
    options: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None


@dataclass
class OptimConfig:
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # Learning rate of the model's head (classifier) relative to the rest: 10 for DeepLab-v2's ASPP.
    head_lr_mult: float = 1.0
    # Cap on the global gradient norm (null: no clipping).
    clip_grad_norm: float | None = None
    # Micro-batches per optimiser step: the effective batch is batch size x accumulate; steps count
    # optimiser steps, so a step draws `accumulate` batches.
    accumulate: int = 1
    # Stop the phase (exit 1, the round not checkpointed) when a loss component passes this many times
    # its running level, the median of its last 50 values but at least 1: healthy losses stay far
    # below, a diverging run passes it within steps (null: stop on non-finite losses only).
    divergence_factor: float | None = 1000.0


@dataclass
class SourceTrainingConfig:
    """Round 0: supervised training on the source domain ("source only")."""

    enabled: bool = True
    steps: int = 1000
    batch_size: int = 2
    lr_schedule: Literal["constant", "onecycle", "poly", "step"] = "poly"
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class Ramp:
    """A value that starts at ``start`` and grows by ``step`` per round up to ``max``."""

    start: float
    step: float
    max: float

    def at(self, round_index: int) -> float:
        """Value for 1-based round ``round_index``."""
        return min(self.start + self.step * (round_index - 1), self.max)


@dataclass
class MiningConfig:
    """Rare-class hard-sample mining (CBST §5): crops centred on pixels of rare predicted classes."""

    enabled: bool = False
    rare_share: float = 1e-3
    probability: float = 0.5


@dataclass
class PolicyConfig:
    name: str = "cbst"
    prior: str | None = None
    mining: MiningConfig = field(default_factory=MiningConfig)
    # Keyword options of the policy constructor, e.g. {threshold: 0.8, negatives: weak} for wst.
    options: dict[str, Any] = field(default_factory=dict)
    # Test-time views for pseudo-label generation (the paper: scales 0.5, 0.75, 1.0 with flip).
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = False


@dataclass
class RoundsConfig:
    """The self-training schedule (CBST §5 and appendix; official code for the source share)."""

    count: int = 3
    portion: Ramp = field(default_factory=lambda: Ramp(0.2, 0.05, 0.5))
    source_share: Ramp = field(default_factory=lambda: Ramp(0.03, 0.0025, 0.06))
    target_epochs: float = 2.0
    steps: int | None = None
    batch_source: int = 1
    batch_target: int = 1
    lr_decay: Literal["constant", "sqrt2"] = "constant"
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class AugmentConfig:
    flip: bool = True
    crop: list[int] | None = None
    scale: list[float] | None = None
    # detection: SSD's photometric distortion (brightness, contrast, saturation, hue) on training images
    photometric: bool = False


@dataclass
class EvalConfig:
    batch_size: int = 8
    every_round: bool = True
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = False
    use_07: bool = False  # detection: VOC07 11-point AP instead of all-point


@dataclass
class LossConfig:
    """An extra loss term (``selftrain list losses``): added to the task losses times ``weight`` in
    the ``phases`` it names ("source": round 0, "rounds": the self-training rounds)."""

    name: str
    weight: float = 1.0
    phases: list[Literal["source", "rounds"]] = field(default_factory=lambda: ["source", "rounds"])
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckpointConfig:
    """Step checkpoints: the round being trained can be resumed at the step after the newest one.
    ``every_steps`` null: only round checkpoints (plus one after an offline round's pseudo-labels)."""

    every_steps: int | None = None


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
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
    pseudo_batch_size: int = 8
    losses: list[LossConfig] = field(default_factory=list)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


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
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist; pass the path of a YAML recipe (see recipes/README.md)")
    if path.resolve() in seen:
        raise ConfigError(f"recipe {path} extends itself through {' -> '.join(map(str, seen))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of keys, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    base = _read_chain(path.parent / str(parent), seen + (path.resolve(),))
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


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value, e.g. rounds.count=2")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
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
            raise ConfigError(f"override {key}: {part} is not a mapping")
        node = child
    node[parts[-1]] = value


# ---------------------------------------------------------------------------------------------
# Strict conversion


def from_dict(cls: type, data: Any, path: str) -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'recipe'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown recipe key {where}{unknown[0]}; valid keys{' under ' + path if path else ''}: {', '.join(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        value = _with_defaults(fields[name], value)
        kwargs[name] = _convert(hints[name], value, f"{path}.{name}" if path else name)
    missing = [n for n, f in fields.items() if n not in kwargs and _has_no_default(f)]
    if missing:
        raise ConfigError(f"recipe key {path}.{missing[0]} is required")
    return cls(**kwargs)


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
            raise ConfigError(f"recipe key {path} is {value!r}; choose one of: {', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise _type_error(path, "a list", value)
        return [_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(path, "a mapping", value)
        return dict(value)
    return _scalar(tp, value, path)


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
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(path, "a number", value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _type_error(path, "a string", value)
        return value
    raise TypeError(f"unsupported schema type {tp} at {path}")


def _type_error(path: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"recipe key {path} must be {expected}, got {value!r} ({type(value).__name__})")


def _check_values(cfg: RunConfig) -> None:
    """Range checks that types cannot express."""
    checks = [
        (cfg.data.num_classes >= (1 if cfg.task == "detection" else 2),
         "data.num_classes must be at least 2 (1 object class for detection)"),
        (cfg.rounds.count >= 0, "rounds.count must be >= 0"),
        (0 < cfg.rounds.portion.start <= 1 and 0 < cfg.rounds.portion.max <= 1, "rounds.portion values must be in (0, 1]"),
        (0 <= cfg.rounds.source_share.start <= 1, "rounds.source_share.start must be in [0, 1]"),
        (cfg.rounds.batch_source >= 0 and cfg.rounds.batch_target >= 1, "rounds.batch_target must be >= 1"),
        (cfg.rounds.steps is None or cfg.rounds.steps >= 1, "rounds.steps must be >= 1 (or null for target_epochs)"),
        (cfg.source_training.steps >= 0, "source_training.steps must be >= 0"),
        (cfg.source_training.optim.head_lr_mult > 0 and cfg.rounds.optim.head_lr_mult > 0,
         "optim.head_lr_mult must be positive (1: the head trains at the same learning rate)"),
        *((o.accumulate >= 1, f"{key}.optim.accumulate must be >= 1 (1: no gradient accumulation), got {o.accumulate}")
          for key, o in (("source_training", cfg.source_training.optim), ("rounds", cfg.rounds.optim))),
        *((o.clip_grad_norm is None or o.clip_grad_norm > 0,
           f"{key}.optim.clip_grad_norm must be positive, or null for no clipping; got {o.clip_grad_norm}")
          for key, o in (("source_training", cfg.source_training.optim), ("rounds", cfg.rounds.optim))),
        (cfg.checkpoint.every_steps is None or cfg.checkpoint.every_steps >= 1,
         f"checkpoint.every_steps must be >= 1, or null for round checkpoints only; got {cfg.checkpoint.every_steps}"),
        (cfg.data.class_names is None or len(cfg.data.class_names) == cfg.data.num_classes,
         "data.class_names must list data.num_classes names"),
        (cfg.augment.crop is None or len(cfg.augment.crop) == 2, "augment.crop must be [height, width]"),
        (cfg.augment.scale is None or (len(cfg.augment.scale) == 2 and cfg.augment.crop is not None),
         "augment.scale must be [low, high] and needs augment.crop (batches need one size)"),
        (bool(cfg.eval.scales) and all(x > 0 for x in cfg.eval.scales), "eval.scales must be positive, e.g. [0.5, 0.75, 1.0]"),
        (bool(cfg.policy.scales) and all(x > 0 for x in cfg.policy.scales),
         "policy.scales must be positive, e.g. [0.5, 0.75, 1.0]"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: RunConfig) -> str:
    """The resolved recipe as YAML (saved with every run and inside every checkpoint)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
