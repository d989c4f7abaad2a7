"""The round loop (CBST §3, Fig. 1): label the target set, keep the confident part, fine-tune, repeat.

Offline policies (ST, CBST) label the whole target set with the model as it stands, then fine-tune;
online policies (WST, mean teacher) label every target batch as the model trains and store, at the
end of the round, what they make for every target image. The engine only orchestrates; thresholds
live in the policy, segmentation/detection specifics in the task, files in the store and checkpoint
modules, steps in :mod:`selftrain.training`, reporting in callbacks.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset, Subset

from .checkpoint import RunDir, link_atomic, load_checkpoint, save_checkpoint, set_rng_state
from .data.transforms import PseudoLabeled
from .losses import LossTerms
from .pseudo import label_target
from .store import PseudoLabelWriter, open_round
from .tasks import StoredLabels
from .tta import TestTimeAugment
from .teachers import make_teacher
from .types import StepBatch, StepOutputs
from .training import (OptimSpec, batches, make_optimizer, make_scheduler, parameter_groups, seed_everything,
                       train_steps)

log = logging.getLogger(__name__)


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
    lr_schedule: str
    optim: OptimSpec


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


@dataclass
class Engine:
    """Runs round 0 (optional) and the self-training rounds, checkpointing after each."""

    adapter: Any
    policy: Any
    data: RunData
    plan: Plan
    run_dir: RunDir
    recipe_yaml: str
    task: Any = None  # SegmentationTask | DetectionTask (selftrain.tasks); segmentation when None
    seed: int = 0
    device: str = "cpu"
    callbacks: list[Any] = field(default_factory=list)
    terms: LossTerms = field(default_factory=LossTerms)  # extra loss terms (adversarial alignment)

    def __post_init__(self) -> None:
        if self.task is None:
            from .tasks import SegmentationTask

            self.task = SegmentationTask(self.data, mine_probability=self.plan.mining.probability)
        self.teacher = None
        self._last_step: StepBatch | None = None  # what the loss terms' discriminators learn from

    def run(self, resume: bool = False) -> list[dict[str, Any]]:
        """Run (or continue) every round; returns one metrics record per round."""
        self.adapter.to(self.device)
        self.terms.prepare(self.device)
        last = self.run_dir.prepare(self.recipe_yaml, resume)
        self._make_teacher()
        if last is not None:
            self._restore(last)
            log.info("resuming %s after round %d", self.run_dir.root, last)
        else:
            self._round_zero()
        for spec in self.plan.rounds:
            if last is None or spec.index > last:
                self._round(spec)
        self._emit("on_run_end", records=self.records())
        return self.records()

    def records(self) -> list[dict[str, Any]]:
        path = self.run_dir.metrics
        return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []

    # -- round 0 ---------------------------------------------------------------------------------

    def _round_zero(self) -> None:
        seed_everything(self._seed(0))
        if self.plan.init_checkpoint:
            self.adapter.load_state_dict(load_checkpoint(self.plan.init_checkpoint)["model"])
            losses: dict[str, float] = {}
        elif self.plan.source_phase is not None and self.plan.source_phase.steps > 0:
            losses = self._train_source(self.plan.source_phase)
        else:
            losses = {}
        self._finish_round(0, {"phase": "source_only", "losses": losses})

    def _train_source(self, phase: SourcePhase) -> dict[str, float]:
        gen = seed_everything(self._seed(0))
        stream = batches(self._augmented(self.data.source), phase.batch_size, gen, self.data.num_workers,
                         collate_fn=self.task.collate)
        optimizer = make_optimizer(parameter_groups(self.adapter, phase.optim.head_lr_mult), phase.optim)
        scheduler = make_scheduler(optimizer, phase.lr_schedule, phase.steps)
        needs = self.terms.needs("source")
        target = (batches(self._augmented(self.data.target), phase.batch_size, gen, self.data.num_workers,
                          collate_fn=self.task.collate) if needs & {"target", "target_images"} else None)
        counter = iter(range(phase.steps))

        def step() -> dict[str, torch.Tensor]:
            i = next(counter)
            source = self.task.supervised_step(self.adapter, next(stream), self.device)
            batch = next(target) if target is not None else None
            outputs = (self.adapter.forward_train(self.task.images(batch, self.device))
                       if "target" in needs else None)
            return self._step_losses("source", i, i / max(phase.steps, 1), source, outputs, batch)

        losses = train_steps(step_fn=step, optimizer=optimizer, scheduler=scheduler, steps=phase.steps,
                             desc="round 0: source", after_step=self._discriminators("source"))
        return {**losses, **self.terms.take_means()}

    # -- self-training rounds --------------------------------------------------------------------

    def _round(self, spec: RoundSpec) -> None:
        if not getattr(self.policy, "offline", True):
            return self._online_round(spec)
        seed_everything(self._seed(spec.index))
        labeling = self._label(spec)
        losses = self._fine_tune(spec, labeling.predicted_pixels)
        self._finish_round(spec.index, {"phase": "self_training", "portion": spec.portion, "lr": spec.lr,
                                        "source_share": spec.source_share, "steps": spec.steps,
                                        "losses": losses, "pseudo": labeling.to_dict()})

    def _label(self, spec: RoundSpec):
        path = self.run_dir.pseudo(spec.index)
        writer = PseudoLabelWriter(
            path, task="segmentation", round=spec.index, policy=self.policy.name, portion=spec.portion,
            num_classes=self.data.num_classes, class_names=list(self.data.class_names),
            ignore_index=self.data.ignore_index, recipe=self.recipe_yaml,
            checkpoint=str(self.run_dir.checkpoint(spec.index - 1)),
        )
        with writer:
            return label_target(
                adapter=self.adapter, policy=self.policy, dataset=self.data.target, portion=spec.portion,
                writer=writer, scratch=path.with_suffix(".logits.tmp"), batch_size=self.data.pseudo_batch,
                device=torch.device(self.device), ignore_index=self.data.ignore_index, tta=self.data.pseudo_tta,
            )

    def _fine_tune(self, spec: RoundSpec, predicted_pixels: list[int]) -> dict[str, float]:
        gen = seed_everything(self._seed(spec.index) + 1)
        reader = open_round(self.run_dir.pseudo(spec.index))
        target = self._augmented(PseudoLabeled(self.data.target, reader), self._mine(predicted_pixels))
        target_stream = batches(target, self.plan.batch_target, gen, self.data.num_workers, collate_fn=self.task.collate)
        source_stream = self._source_stream(spec, gen)
        optimizer = make_optimizer(self._param_groups(), self.plan.optim, lr=spec.lr)
        scheduler = make_scheduler(optimizer, "constant", spec.steps)
        done, total = self._steps_before(spec.index), sum(r.steps for r in self.plan.rounds)
        counter = iter(range(spec.steps))

        def step() -> dict[str, torch.Tensor]:
            i = next(counter)
            source = self._supervised(source_stream)
            batch = next(target_stream)
            target = self.task.supervised_step(self.adapter, batch, self.device)
            return self._step_losses("rounds", i, (done + i) / max(total, 1), source, target, batch)

        try:
            losses = train_steps(step_fn=step, optimizer=optimizer, scheduler=scheduler, steps=spec.steps,
                                 desc=f"round {spec.index}: fine-tune", after_step=self._discriminators("rounds"))
        finally:
            reader.close()
        return {**losses, **self.terms.take_means()}

    def _param_groups(self) -> list[dict[str, Any]]:
        return parameter_groups(self.adapter, self.plan.optim.head_lr_mult)

    def _supervised(self, stream) -> StepOutputs | None:
        return self.task.supervised_step(self.adapter, next(stream), self.device) if stream is not None else None

    def _step_losses(self, phase: str, i: int, progress: float, source: StepOutputs | None,
                     target: StepOutputs | None, target_batch: dict[str, Any] | None) -> dict[str, torch.Tensor]:
        """The adapter's named losses per domain (``src/``, ``tgt/``), then the extra loss terms'."""
        losses = {f"src/{k}": v for k, v in source.losses.items()} if source is not None else {}
        if target is not None:
            losses.update({f"tgt/{k}": v for k, v in target.losses.items()})
        if self.terms.needs(phase):
            images = self.task.images(target_batch, self.device) if target_batch is not None else None
            self._last_step = StepBatch(source=source, target=target, step=i, progress=progress,
                                        adapter=self.adapter, target_images=images)
            losses.update(self.terms.losses(self._last_step, phase))
        return losses

    def _discriminators(self, phase: str, then=None):
        """``after_step``: the loss terms' discriminators learn from the step just taken, then ``then(i)``."""
        def after(i: int) -> None:
            if self.terms.needs(phase):
                self.terms.discriminator_step(self._last_step, phase)
                self._last_step = None  # the step's outputs are not kept past it
            if then is not None:
                then(i)

        return after

    # -- online rounds (WST, mean teacher) ------------------------------------------------------

    def _make_teacher(self) -> None:
        if self.policy is not None and not getattr(self.policy, "offline", True):
            self.teacher = make_teacher(self.policy.teacher, self.adapter, **self.policy.teacher_options())

    def _online_round(self, spec: RoundSpec) -> None:
        """Each step: the teacher labels a target batch, the policy keeps what it trusts, the student
        learns from it (and from a source batch); then the round's labels are stored for every image."""
        gen = seed_everything(self._seed(spec.index) + 1)
        target = batches(self._augmented(self.data.target), self.plan.batch_target, gen, self.data.num_workers,
                         collate_fn=self.task.collate)
        source_stream = self._source_stream(spec, gen)
        optimizer = make_optimizer(self._param_groups(), self.plan.optim, lr=spec.lr)
        done, total = self._steps_before(spec.index), sum(r.steps for r in self.plan.rounds)
        counter = iter(range(spec.steps))

        def step() -> dict[str, torch.Tensor]:
            i = next(counter)
            source = self._supervised(source_stream)
            batch = next(target)
            outputs = self.task.online_step(self.adapter, self.teacher, self.policy, batch, device=self.device,
                                            progress=(done + i) / max(total, 1))
            return self._step_losses("rounds", i, (done + i) / max(total, 1), source, outputs, batch)

        losses = train_steps(step_fn=step, optimizer=optimizer, scheduler=make_scheduler(optimizer, "constant", spec.steps),
                             steps=spec.steps, desc=f"round {spec.index}: online",
                             after_step=self._discriminators("rounds", then=self._teacher_update(done)))
        losses.update(self.terms.take_means())
        stored = self._store_online(spec, progress_value=(done + spec.steps) / max(total, 1))
        self._finish_round(spec.index, {"phase": "online", "lr": spec.lr, "source_share": spec.source_share,
                                        "steps": spec.steps, "losses": losses,
                                        "pseudo": self._online_summary(stored)})

    def _teacher_update(self, done: int):
        return lambda i: self.teacher.update(self.adapter, done + i)

    def _steps_before(self, index: int) -> int:
        return sum(r.steps for r in self.plan.rounds if r.index < index)

    def _store_online(self, spec: RoundSpec, progress_value: float) -> StoredLabels:
        """Write the round's labels for every target image; their counts (and precision) per class."""
        writer = PseudoLabelWriter(
            self.run_dir.pseudo(spec.index), task=self.task.name, round=spec.index, policy=self.policy.name,
            portion=1.0, num_classes=self.data.num_classes, class_names=list(self.data.class_names),
            ignore_index=self.data.ignore_index, recipe=self.recipe_yaml,
            checkpoint=str(self.run_dir.checkpoint(spec.index)),
        )
        with writer:
            return self.task.write_online(self.teacher, self.policy, self.data.target, writer, device=self.device,
                                          progress_value=min(progress_value, 1.0))

    def _online_summary(self, stored: StoredLabels) -> dict[str, Any]:
        """Labels per class of the stored round (and their precision), for metrics.jsonl and the plots."""
        threshold = float(getattr(self.policy, "threshold", float("nan")))
        return {"selected_pixels": stored.counts, "thresholds": [threshold] * len(stored.counts),
                "precision": stored.precision, "precision_overall": stored.precision_overall, "selected_share": None,
                **stored.extra_record()}

    def _source_stream(self, spec: RoundSpec, gen: torch.Generator):
        if self.plan.batch_source == 0 or spec.source_share <= 0:
            return None
        n = len(self.data.source)
        count = min(n, max(self.plan.batch_source, round(spec.source_share * n)))
        subset = Subset(self.data.source, torch.randperm(n, generator=gen)[:count].tolist())
        return batches(self._augmented(subset), self.plan.batch_source, gen, self.data.num_workers,
                       collate_fn=self.task.collate)

    def _mine(self, predicted_pixels: list[int]) -> list[int]:
        if not self.plan.mining.enabled:
            return []
        from .policies.functional import rare_classes

        return rare_classes(torch.tensor(predicted_pixels), self.plan.mining.rare_share).tolist()

    def _augmented(self, dataset: Dataset, mine_classes: Sequence[int] = ()) -> Dataset:
        return self.task.augment(dataset, mine_classes)

    # -- evaluation, checkpoints, resume ---------------------------------------------------------

    def _finish_round(self, index: int, record: dict[str, Any]) -> None:
        record = {"round": index, **record}
        if self.data.target_val is not None and self._evaluates(index):
            record["eval"] = self.task.evaluate(self.adapter, self.data.target_val, device=self.device,
                                                desc=f"round {index}: evaluate")
        self._emit("on_round_end", record=record, run_dir=self.run_dir, class_names=list(self.data.class_names))
        path = self.run_dir.checkpoint(index)
        save_checkpoint(path, round_index=index, model=self.adapter.state_dict(), recipe_yaml=self.recipe_yaml,
                        policy=self._policy_state(), metrics=record.get("eval"),
                        teacher=self.teacher.state_dict() if self.teacher is not None else None,
                        loss_terms=self.terms.state_dict() if self.terms else None)
        link_atomic(path, self.run_dir.last)

    def _evaluates(self, index: int) -> bool:
        """Every round, or (eval.every_round: false) the source-only round and the last one."""
        last = self.plan.rounds[-1].index if self.plan.rounds else 0
        return self.data.eval_every_round or index in (0, last)

    def _policy_state(self) -> dict[str, Any] | None:
        return self.policy.state_dict() if self.policy is not None else None

    def _restore(self, last: int) -> None:
        state = load_checkpoint(self.run_dir.checkpoint(last))
        self.adapter.load_state_dict(state["model"])
        if self.policy is not None and state.get("policy"):
            self.policy.load_state_dict(state["policy"])
        if self.teacher is not None and state.get("teacher"):
            self.teacher.load_state_dict(state["teacher"])
        if self.terms and state.get("loss_terms"):
            self.terms.load_state_dict(state["loss_terms"])
        set_rng_state(state["rng"])

    def _seed(self, round_index: int) -> int:
        # Each round draws from its own stream so a resumed run repeats the rounds it redoes exactly.
        return self.seed * 1000 + round_index * 17

    def _emit(self, event: str, **kwargs: Any) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, event, None)
            if fn is not None:
                fn(**kwargs)


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
