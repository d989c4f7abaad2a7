"""What a run trains on, as data: its data sets (:class:`RunData`), the plan of rounds, and the
training phases. Round 0 (source training), an offline round's fine-tuning and an online round are
each a :class:`Phase`, run by one loop (:meth:`selftrain.training.StepRunner.run`).

A step draws a source batch (ground truth) when the phase has a source stream, then a target batch,
and turns the target batch into losses as ``target_use`` says: ``"images"`` (the images only, for a
loss term that makes its own pass), ``"forward"`` (an unlabelled forward pass for loss terms),
``"supervised"`` (stored pseudo-labels) or ``"online"`` (the teacher labels the batch and the
policy keeps what it trusts). The loss terms active in the phase add theirs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal, Sequence

import torch
from torch.utils.data import Dataset, Subset

from .policies.functional import rare_classes
from .streams import BatchStream
from .training import LRSchedule, OptimSpec, StepResult
from .tta import TestTimeAugment
from .types import StepBatch, StepOutputs

TargetUse = Literal["images", "forward", "supervised", "online"]


@dataclass(frozen=True)
class RunData:
    """Data sets and the per-sample options the engine applies to them."""

    source: Dataset
    target: Dataset
    target_val: Dataset | None
    num_classes: int
    class_names: Sequence[str]
    ignore_index: int = 255
    flip: bool = True
    crop: Sequence[int] | None = None
    scale: Sequence[float] | None = None
    num_workers: int = 0
    eval_batch: int = 8
    pseudo_batch: int = 8
    eval_tta: TestTimeAugment = TestTimeAugment()
    pseudo_tta: TestTimeAugment = TestTimeAugment()
    eval_every_round: bool = True
    photometric: bool = False
    subset_metrics: dict[str, tuple[int, ...]] = field(default_factory=dict)  # mIoU over class subsets


@dataclass(frozen=True)
class RoundSpec:
    """One self-training round: target portion p, source share, steps and learning rate."""

    index: int
    portion: float
    source_share: float
    steps: int
    lr: float


@dataclass(frozen=True)
class SourcePhase:
    """Round 0: supervised source-only training."""

    steps: int
    batch_size: int
    lr_schedule: str | LRSchedule
    optim: OptimSpec


@dataclass(frozen=True)
class Mining:
    """Rare-class hard-sample mining for target crops (CBST §5)."""

    enabled: bool = False
    rare_share: float = 1e-3
    probability: float = 0.5


@dataclass(frozen=True)
class Plan:
    """What to train: round 0 (or a checkpoint to start from) and the self-training rounds."""

    source_phase: SourcePhase | None
    rounds: list[RoundSpec]
    optim: OptimSpec
    batch_source: int
    batch_target: int
    mining: Mining = field(default_factory=Mining)
    init_checkpoint: str | None = None


def mined_classes(mining: Mining, predicted_pixels: Sequence[int]) -> list[int]:
    """The classes whose crops hard-sample mining centres on (none when mining is off)."""
    if not mining.enabled:
        return []
    return rare_classes(torch.tensor(list(predicted_pixels)), mining.rare_share).tolist()


def plan_rounds(*, count: int, portion, source_share, steps: int | None, target_epochs: float, n_target: int,
                batch_target: int, lr: float, lr_decay: str) -> list[RoundSpec]:
    """The schedule: p and the source share ramp per round; lr constant or divided by sqrt(2) per round."""
    if steps is None:
        steps = max(1, math.ceil(target_epochs * n_target / batch_target))
    out = []
    for r in range(1, count + 1):
        round_lr = lr / (math.sqrt(2) ** (r - 1)) if lr_decay == "sqrt2" else lr
        out.append(RoundSpec(index=r, portion=portion.at(r), source_share=source_share.at(r), steps=steps, lr=round_lr))
    return out


@dataclass(frozen=True)
class Draw:
    """The batches of one domain: ``batch`` samples of ``dataset`` a step; with ``subset``, of a random
    subset of that many samples drawn once with the phase's generator."""

    dataset: Dataset
    batch: int
    subset: int | None = None


@dataclass(frozen=True)
class Phase:
    """What one phase trains on and how.

    ``terms``: the loss-term phase, "source" (round 0) or "rounds"; ``optim`` carries the phase's
    learning rate; loss terms and online policies see ``progress = (progress_offset + step) /
    progress_total``.
    """

    round: int
    desc: str
    terms: str
    steps: int
    optim: OptimSpec
    schedule: str | LRSchedule
    seed: int
    source: Draw | None
    target: Draw | None
    target_use: TargetUse | None
    progress_offset: int = 0
    progress_total: int = 1

    def progress(self, step: int) -> float:
        return (self.progress_offset + step) / max(self.progress_total, 1)


def source_phase(source: SourcePhase, *, task: Any, data: RunData, needs: set[str], seed: int) -> Phase:
    """Round 0: source batches with ground truth, and target batches when a loss term needs them."""
    use = "forward" if "target" in needs else "images" if "target_images" in needs else None
    return Phase(round=0, desc="round 0: source", terms="source", steps=source.steps, optim=source.optim,
                 schedule=source.lr_schedule, seed=seed, source=Draw(task.augment(data.source), source.batch_size),
                 target=Draw(task.augment(data.target), source.batch_size) if use else None, target_use=use,
                 progress_total=source.steps)


def round_phase(spec: RoundSpec, plan: Plan, *, task: Any, data: RunData, target: Dataset, use: TargetUse, desc: str,
                seed: int) -> Phase:
    """A self-training round: ``target`` batches used as ``use``, plus a random share of the source set
    (at least one batch) when the round mixes source images in; constant learning rate."""
    n = len(data.source)
    source = (Draw(task.augment(data.source), plan.batch_source, min(n, max(plan.batch_source, round(spec.source_share * n))))
              if plan.batch_source > 0 and spec.source_share > 0 else None)
    return Phase(round=spec.index, desc=desc, terms="rounds", steps=spec.steps, optim=replace(plan.optim, lr=spec.lr),
                 schedule="constant", seed=seed, source=source, target=Draw(target, plan.batch_target), target_use=use,
                 progress_offset=sum(r.steps for r in plan.rounds if r.index < spec.index),
                 progress_total=sum(r.steps for r in plan.rounds))


def open_streams(phase: Phase, generator: torch.Generator, *, num_workers: int, collate_fn: Callable,
                 pin_memory: bool = False) -> dict[str, BatchStream]:
    """The phase's batch streams, sharing ``generator`` (which also draws the source subset)."""
    streams = {}
    for name, draw in (("target", phase.target), ("source", phase.source)):
        if draw is None:
            continue
        dataset = draw.dataset
        if draw.subset is not None:
            dataset = Subset(dataset, torch.randperm(len(dataset), generator=generator)[:draw.subset].tolist())
        streams[name] = BatchStream(dataset, draw.batch, generator, num_workers=num_workers, collate_fn=collate_fn,
                                    pin_memory=pin_memory)
    return streams


def step_function(phase: Phase, streams: dict[str, BatchStream], *, adapter: Any, task: Any, terms: Any,
                  device: str, teacher: Any = None, policy: Any = None) -> Callable[[int], StepResult]:
    """``step(i) -> StepResult``: the named losses of one micro-batch (``src/``, ``tgt/``, then the
    loss terms' ``<key>/``) and the :class:`StepBatch` the terms' discriminators learn from."""
    with_terms = bool(terms.needs(phase.terms))

    def step(i: int) -> StepResult:
        source = task.supervised_step(adapter, next(streams["source"]), device) if "source" in streams else None
        batch = next(streams["target"]) if "target" in streams else None
        target = _target_outputs(phase, batch, i, adapter=adapter, task=task, device=device, teacher=teacher,
                                 policy=policy)
        losses = {f"src/{k}": v for k, v in source.losses.items()} if source is not None else {}
        if target is not None:
            losses.update({f"tgt/{k}": v for k, v in target.losses.items()})
        if not with_terms:
            return StepResult(losses)
        images = task.images(batch, device) if batch is not None else None
        outputs = StepBatch(source=source, target=target, step=i, progress=phase.progress(i), adapter=adapter,
                            target_images=images)
        return StepResult({**losses, **terms.losses(outputs, phase.terms)}, outputs)

    return step


def _target_outputs(phase: Phase, batch: Any, i: int, *, adapter: Any, task: Any, device: str, teacher: Any,
                    policy: Any) -> StepOutputs | None:
    if batch is None or phase.target_use in (None, "images"):
        return None
    if phase.target_use == "forward":
        return adapter.forward_train(task.images(batch, device))
    if phase.target_use == "supervised":
        return task.supervised_step(adapter, batch, device)
    return task.online_step(adapter, teacher, policy, batch, device=device, progress=phase.progress(i))
