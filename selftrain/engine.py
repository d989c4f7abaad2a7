"""The round loop (CBST §3, Fig. 1): label the target set, keep the confident part, fine-tune, repeat.

Offline policies (ST, CBST) label the whole target set with the model as it stands, then fine-tune;
online policies (WST, mean teacher) label every target batch as the model trains and store, at the
end of the round, what they make for every target image. The engine only orchestrates rounds:
phases are data (:mod:`selftrain.phases`) run by the step runner (:mod:`selftrain.training`),
thresholds live in the policy, segmentation/detection specifics in the task, files in the store
and checkpoint modules, reporting in callbacks.

Resume: round checkpoints close every round; the step checkpoint (``checkpoint.every_steps``, and
always once an offline round's pseudo-labels are written) lets ``--resume`` continue the round
being trained at the step after it, with every generator and data stream where it was.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import Dataset

from . import dist
from .checkpoint import (RunDir, StepCheckpoint, link_atomic, load_model, load_weights, rng_state, save_checkpoint,
                         save_state, set_rng_state, writing)
from .data.transforms import PseudoLabeled
from .losses import DiscriminatorUpdate, LossTerms
from .phases import (Phase, Plan, RoundSpec, RunData, mined_classes, open_streams, round_phase, source_phase,
                     step_function)
from .pseudo import label_round
from .store import RoundMeta, open_round, written_by
from .teachers import TeacherUpdate, make_teacher
from .types import RoundLabels
from .training import (FiniteGuard, LossMeter, Precision, Replicas, StepRunner, make_optimizer, make_scheduler,
                       parameter_groups, seed_everything)

log = logging.getLogger(__name__)


@dataclass
class Engine:
    """Runs round 0 (optional) and the self-training rounds, checkpointing after each."""

    adapter: Any
    policy: Any
    data: RunData
    plan: Plan
    run_dir: RunDir
    recipe_yaml: str
    task: Any  # SegmentationTask | DetectionTask (selftrain.tasks)
    seed: int = 0
    device: str = "cpu"
    callbacks: list[Any] = field(default_factory=list)
    terms: LossTerms = field(default_factory=LossTerms)  # extra loss terms (adversarial alignment)
    precision: Precision = Precision()
    every_steps: int | None = None  # step checkpoints (None: only the one after an offline round's labels)

    def __post_init__(self) -> None:
        self.teacher = None  # made when the first online round starts, from the model it starts from
        if not dist.is_main():
            self.callbacks = []  # under torchrun rank 0 alone writes metrics, plots and the console

    def run(self, resume: bool = False) -> list[dict[str, Any]]:
        """Run (or continue) every round; returns one metrics record per round."""
        self.adapter.to(self.device)
        self.terms.prepare(self.device)
        with self.run_dir.open(self.recipe_yaml, resume) as last:  # the folder stays locked until the end
            return self._run(last, resume)

    def _run(self, last: int | None, resume: bool) -> list[dict[str, Any]]:
        if last is not None:
            self._restore(self.run_dir.round_state(last), self.run_dir.round_file(last))
            log.info("resuming %s after round %d", self.run_dir.root, last)
        first = 0 if last is None else last + 1
        state = self.run_dir.step_state(self.recipe_yaml, first) if resume else None
        if state is not None:
            log.info("resuming round %d at step %d", first, state["step"])
        if first == 0:
            self._round_zero(state)
        for spec in self.plan.rounds:
            if spec.index >= first:
                self._round(spec, state if spec.index == first else None)
        records = self.records()
        for cb in self.callbacks:
            cb.on_run_end(records=records)
        return records

    def records(self) -> list[dict[str, Any]]:
        return self.run_dir.records()

    # -- rounds ----------------------------------------------------------------------------------

    def _round_zero(self, state: dict[str, Any] | None) -> None:
        seed_everything(self._seed(0))
        source = self.plan.source_phase
        losses: dict[str, float] = {}
        if self.plan.init_checkpoint:
            load_weights(self.adapter, self.plan.init_checkpoint, recipe_yaml=self.recipe_yaml)
        elif source is not None and source.steps > 0:
            phase = source_phase(source, task=self.task, data=self.data, needs=self.terms.needs("source"),
                                 seed=self._seed(0))
            losses = self._train(phase, state)
        self._finish_round(0, {"phase": "source_only", "losses": losses})

    def _round(self, spec: RoundSpec, state: dict[str, Any] | None) -> None:
        if not self.policy.offline:
            return self._online_round(spec, state)
        seed_everything(self._seed(spec.index))
        if state is not None and written_by(self.run_dir.pseudo(spec.index), spec.index, self.recipe_yaml):
            self.policy.load_state_dict(state["policy"])
            labeling = state["labeling"]
        else:
            with self.precision.autocast():
                labeling = self._label(spec, self.adapter, portion=spec.portion, checkpoint_round=spec.index - 1).to_dict()
            state = None
            save_state(self.run_dir.step, self._state(spec.index, 0, labeling=labeling))
            _warn_if_empty(spec, labeling)
        with open_round(self.run_dir.pseudo(spec.index), expect_task=self.task.name,
                        expect_num_classes=self.data.num_classes, expect_class_names=list(self.data.class_names),
                        expect_round=spec.index, expect_recipe=self.recipe_yaml) as reader:
            mined = self.task.augment(PseudoLabeled(self.data.target, reader),
                                      mined_classes(self.plan.mining, RoundLabels.from_dict(labeling).predicted))
            phase = self._round_phase(spec, mined, "supervised", f"round {spec.index}: fine-tune")
            losses = self._train(phase, state if state and state["step"] > 0 else None, labeling=labeling)
        self._finish_round(spec.index, {"phase": "self_training", "portion": spec.portion, "lr": spec.lr,
                                        "source_share": spec.source_share, "steps": spec.steps,
                                        "losses": losses, "pseudo": labeling})

    def _online_round(self, spec: RoundSpec, state: dict[str, Any] | None) -> None:
        """Each step: the teacher labels a target batch, the policy keeps what it trusts, the student
        learns from it (and from a source batch); then the round's labels are stored for every image."""
        if self.teacher is None:
            self.teacher = make_teacher(self.policy.teacher, self.adapter, **self.policy.teacher_options())
        phase = self._round_phase(spec, self.task.augment(self.data.target), "online", f"round {spec.index}: online")
        losses = self._train(phase, state)
        with self.precision.autocast():
            stored = self._label(spec, self.teacher, portion=1.0, checkpoint_round=spec.index,
                                 progress=phase.progress(spec.steps))
        self._finish_round(spec.index, {"phase": "online", "lr": spec.lr, "source_share": spec.source_share,
                                        "steps": spec.steps, "losses": losses, "pseudo": stored.to_dict()})

    def _round_phase(self, spec: RoundSpec, target: Dataset, use: str, desc: str) -> Phase:
        return round_phase(spec, self.plan, task=self.task, data=self.data, target=target, use=use, desc=desc,
                           seed=self._seed(spec.index) + 1)

    # -- one phase through the step runner --------------------------------------------------------

    def _train(self, phase: Phase, state: dict[str, Any] | None, **extra: Any) -> dict[str, float]:
        """Run ``phase`` (from ``state``, a step checkpoint of it, when given); the mean losses."""
        gen = seed_everything(phase.seed, per_rank=True)
        streams = open_streams(phase, gen, num_workers=self.data.num_workers, collate_fn=self.task.collate,
                               pin_memory=self.device.startswith("cuda"))
        optimizer = make_optimizer(parameter_groups(self.adapter, phase.optim.head_lr_mult), phase.optim)
        meter = LossMeter()
        discriminators = DiscriminatorUpdate(self.terms, phase.terms) if self.terms.needs(phase.terms) else None
        hooks = [FiniteGuard(phase.optim.divergence_factor), *([discriminators] if discriminators else []), meter]
        if dist.active():  # before the teacher's update: it copies the buffers rank 0 broadcasts
            hooks.insert(1, Replicas([self.adapter, *(e.term for e in self.terms.entries)]))
        if phase.target_use == "online":
            hooks.append(TeacherUpdate(self.teacher, self.adapter, offset=phase.progress_offset))
        runner = StepRunner(optimizer=optimizer, scheduler=make_scheduler(optimizer, phase.schedule, phase.steps),
                            precision=self.precision, clip_grad_norm=phase.optim.clip_grad_norm,
                            accumulate=phase.optim.accumulate, hooks=hooks)
        if self.every_steps:
            runner.hooks.append(StepCheckpoint(self.every_steps, lambda done: save_state(self.run_dir.step, self._state(
                phase.round, done, model=self.adapter.state_dict(), runner=runner.state_dict(), generator=gen.get_state(),
                streams={k: s.state_dict() for k, s in streams.items()}, **extra))))
        start = self._load_step(state, runner, streams, gen) if state is not None else 0
        step = step_function(phase, streams, adapter=self.adapter, task=self.task, terms=self.terms,
                             device=self.device, teacher=self.teacher, policy=self.policy)
        runner.run(step, steps=phase.steps, start=start, desc=phase.desc)
        return {**meter.means(phase.steps), **(discriminators.meter.means(phase.steps) if discriminators else {})}

    def _state(self, round_index: int, steps_done: int, **parts: Any) -> dict[str, Any]:
        """A step checkpoint: ``parts`` plus what every round carries, the RNG state taken last."""
        return {"kind": "step", "round": round_index, "step": steps_done, "recipe": self.recipe_yaml, **parts,
                **self._carried(), "rng": rng_state()}

    def _load_step(self, state: dict[str, Any], runner: StepRunner, streams: dict, gen) -> int:
        load_model(self.adapter, state, self.run_dir.step, recipe_yaml=self.recipe_yaml)
        runner.load_state_dict(state["runner"])
        for name, stream in streams.items():
            stream.load_state_dict(state["streams"][name])  # may open a loader: before the RNG is restored
        gen.set_state(state["generator"])
        self._restore(state, self.run_dir.step)
        return int(state["step"])

    # -- labels ----------------------------------------------------------------------------------

    def _label(self, spec: RoundSpec, model: Any, *, portion: float, checkpoint_round: int,
               progress: float = 1.0) -> RoundLabels:
        """Label the target set with ``model`` (the adapter offline, the teacher online) into the
        round's file; what was stored, per class."""
        path = self.run_dir.pseudo(spec.index)
        meta = RoundMeta(task=self.task.name, round=spec.index, policy=self.policy.name, portion=portion,
                         num_classes=self.data.num_classes, class_names=list(self.data.class_names),
                         ignore_index=self.data.ignore_index, recipe=self.recipe_yaml,
                         checkpoint=str(self.run_dir.checkpoint(checkpoint_round)))
        labeller = self.task.labeller(self.policy, portion=portion, progress=progress, device=self.device)
        offline = bool(self.policy.offline)
        with writing(path, among_reads=True):
            return label_round(
                labeller, lambda part, scratch: self.task.predictions(model, part, scratch, device=self.device,
                                                                      offline=offline),
                self.task.sink, dataset=self.data.target, batch_size=self.data.pseudo_batch, meta=meta, path=path)

    # -- evaluation, checkpoints, resume ---------------------------------------------------------

    def _finish_round(self, index: int, record: dict[str, Any]) -> None:
        record = {"round": index, **record}
        if self.data.target_val is not None and self._evaluates(index):
            with self.precision.autocast():
                record["eval"] = self.task.evaluate(self.adapter, self.data.target_val, device=self.device,
                                                    desc=f"round {index}: evaluate")
        for cb in self.callbacks:
            cb.on_round_end(record=record, run_dir=self.run_dir, class_names=list(self.data.class_names))
        path = self.run_dir.checkpoint(index)
        save_checkpoint(path, round_index=index, model=self.adapter.state_dict(), recipe_yaml=self.recipe_yaml,
                        record=record, **self._carried())
        link_atomic(path, self.run_dir.last)
        if dist.is_main():
            with writing(self.run_dir.step):
                self.run_dir.step.unlink(missing_ok=True)  # the round's checkpoint supersedes it
        dist.barrier()  # the other ranks read nothing of the round before rank 0 has written it

    def _evaluates(self, index: int) -> bool:
        """Every round, or (eval.every_round: false) the source-only round and the last one."""
        last = self.plan.rounds[-1].index if self.plan.rounds else 0
        return self.data.eval_every_round or index in (0, last)

    def _carried(self) -> dict[str, Any]:
        """What lives across rounds besides the model: policy, teacher, loss terms."""
        return {"policy": self.policy.state_dict() if self.policy is not None else None,
                "teacher": self.teacher.state_dict() if self.teacher is not None else None,
                "loss_terms": self.terms.state_dict() if self.terms else None}

    def _restore(self, state: dict[str, Any], file: Any) -> None:
        """Model (round checkpoints), policy, teacher, loss terms, then the RNG state."""
        if state.get("kind") != "step":
            load_model(self.adapter, state, file, recipe_yaml=self.recipe_yaml)
        if self.policy is not None and state.get("policy"):
            self.policy.load_state_dict(state["policy"])
        if state.get("teacher"):
            if self.teacher is None:
                self.teacher = make_teacher(self.policy.teacher, self.adapter, **self.policy.teacher_options())
            self.teacher.load_state_dict(state["teacher"])
        if self.terms and state.get("loss_terms"):
            self.terms.load_state_dict(state["loss_terms"])
        set_rng_state(state["rng"])

    def _seed(self, round_index: int) -> int:
        # Each round draws from its own stream so a resumed run repeats the rounds it redoes exactly.
        return self.seed * 1000 + round_index * 17



def _warn_if_empty(spec: RoundSpec, labeling: dict[str, Any]) -> None:
    """A round whose pseudo-labels are all ignored fine-tunes on source images alone: say so."""
    if sum(RoundLabels.from_dict(labeling).selected) == 0:
        log.warning("round %d: no target pixel passed the thresholds (its pseudo-labels are all ignored), so the "
                    "round learns nothing from the target set; raise rounds.portion (%g this round) or train round 0 "
                    "longer", spec.index, spec.portion)
