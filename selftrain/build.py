"""The only place that turns a recipe into objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .callbacks import ConsoleReport, MetricsWriter, PlotWriter, TensorBoardWriter
from .checkpoint import RunDir
from .config import RunConfig, to_yaml
from .data import build_split, class_names, subset_metrics
from .dist import local_device
from .engine import Engine
from .phases import Mining, Plan, RunData, SourcePhase, plan_rounds
from .errors import ConfigError, DataError
from .losses import LOSSES, LossTerms, WeightedTerm
from .training import LRSchedule, OptimSpec, Precision, parameter_groups, seed_everything
from .tasks import build_task
from .tta import TestTimeAugment




def build_data(cfg: RunConfig) -> RunData:
    """Source (with labels), target (labels hidden from training) and target val."""
    source = build_split(cfg.data.source, cfg, with_labels=True)
    target = build_split(cfg.data.target, cfg, with_labels=False)
    val = build_split(cfg.data.target_val, cfg, with_labels=True) if cfg.data.target_val else None
    for what, ds in (("data.source", source), ("data.target", target), ("data.target_val", val)):
        if ds is not None and len(ds) == 0:
            raise DataError(f"{what} holds no images; point it at a non-empty data set")
    names = class_names(cfg, source)
    return RunData(
        source=source, target=target, target_val=val, num_classes=cfg.data.num_classes, class_names=names,
        ignore_index=cfg.data.ignore_index, flip=cfg.augment.flip, crop=cfg.augment.crop, scale=cfg.augment.scale,
        num_workers=cfg.data.num_workers, eval_batch=cfg.eval.batch_size, pseudo_batch=cfg.pseudo_batch_size,
        eval_tta=TestTimeAugment(tuple(cfg.eval.scales), cfg.eval.flip),
        pseudo_tta=TestTimeAugment(tuple(cfg.policy.scales), cfg.policy.flip), eval_every_round=cfg.eval.every_round,
        photometric=cfg.augment.photometric, subset_metrics=subset_metrics(names),
    )


def build_target_dataset(cfg: RunConfig) -> tuple[Any, list[str]]:
    """The target training set as the run read it (labels hidden; ``ground_truth(i)`` when present)."""
    target = build_split(cfg.data.target, cfg, with_labels=False)
    return target, class_names(cfg, target)


def build_adapter(cfg: RunConfig) -> Any:
    from selftrain.adapters import ADAPTERS

    entry = ADAPTERS.entry(cfg.model.name)
    if not entry.supports(cfg.task):
        raise ConfigError(f"adapter {cfg.model.name} is a {entry.tasks[0]} model but the recipe's task is {cfg.task}; "
                          f"set task: {entry.tasks[0]} or pick one of: {', '.join(ADAPTERS.names(task=cfg.task))}")
    builder = entry.build
    kwargs = {"num_classes": cfg.data.num_classes, **cfg.model.options}
    if cfg.task == "segmentation":
        kwargs["ignore_index"] = cfg.data.ignore_index
    try:
        adapter = builder(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"model.options do not fit adapter {cfg.model.name}: {exc}") from None
    multiple = getattr(adapter, "input_multiple", 1)
    if cfg.augment.crop is not None and multiple > 1:  # found now, before the run folder exists
        from selftrain.adapters.segmentation import check_input_size

        check_input_size(tuple(cfg.augment.crop), multiple, what=f"augment.crop {list(cfg.augment.crop)}: a crop of")
    for key, optim in (("source_training", cfg.source_training.optim), ("rounds", cfg.rounds.optim)):
        try:
            parameter_groups(adapter, optim.head_lr_mult)
        except ValueError as exc:
            raise ConfigError(f"{key}.{exc} (model {cfg.model.name})") from None
    return adapter


def build_policy(cfg: RunConfig) -> Any:
    from .policies import POLICIES

    if cfg.rounds.count == 0:
        return None
    entry = POLICIES.entry(cfg.policy.name)
    if not entry.supports(cfg.task):
        raise ConfigError(f"policy {cfg.policy.name!r} does not work for {cfg.task}; choose one of: "
                          f"{', '.join(POLICIES.names(task=cfg.task))}")
    run = {"num_classes": cfg.data.num_classes, "ignore_index": cfg.data.ignore_index}
    kwargs: dict[str, Any] = {**{k: run[k] for k in entry.meta.get("takes", ())}, **cfg.policy.options}
    if entry.meta.get("prior"):
        if not cfg.policy.prior:
            raise ConfigError(f"policy {cfg.policy.name} needs policy.prior: the path of a prior built with "
                              "`selftrain priors build`")
        from .priors import load_prior

        kwargs["prior"] = load_prior(cfg.policy.prior, num_classes=cfg.data.num_classes)
    elif cfg.policy.prior:
        raise ConfigError(f"policy.prior is only used by st_sp and cbst_sp, not {cfg.policy.name}; remove it")
    try:
        return entry.build(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"policy.options do not fit policy {cfg.policy.name}: {exc}") from None


def build_plan(cfg: RunConfig, n_target: int) -> Plan:
    st = cfg.source_training
    schedule = LRSchedule(st.lr_schedule, tuple(st.lr_milestones) if st.lr_milestones else None, st.lr_gamma)
    source_phase = SourcePhase(steps=st.steps, batch_size=st.batch_size, lr_schedule=schedule,
                               optim=OptimSpec(**st.optim.__dict__)) if st.enabled else None
    r = cfg.rounds
    rounds = plan_rounds(count=r.count, portion=r.portion, source_share=r.source_share, steps=r.steps,
                         target_epochs=r.target_epochs, n_target=n_target, batch_target=r.batch_target,
                         lr=r.optim.lr, lr_decay=r.lr_decay)
    m = cfg.policy.mining
    return Plan(source_phase=source_phase, rounds=rounds, optim=OptimSpec(**r.optim.__dict__),
                batch_source=r.batch_source, batch_target=r.batch_target,
                mining=Mining(enabled=m.enabled, rare_share=m.rare_share, probability=m.probability),
                init_checkpoint=cfg.model.checkpoint)


def build_loss_terms(cfg: RunConfig, adapter: Any) -> LossTerms:
    """The recipe's extra loss terms, checked against the model, the task and the schedule."""
    entries, seen = [], {}
    for i, spec in enumerate(cfg.losses):
        where = f"losses[{i}] ({spec.name})"
        builder = LOSSES.get(spec.name)
        try:
            term = builder(**spec.options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: options do not fit: {exc}") from None
        term.attach(adapter, cfg.task)
        if "rounds" in spec.phases and "source" in term.needs and cfg.rounds.count and (
                cfg.rounds.batch_source == 0 or cfg.rounds.source_share.start <= 0):
            raise ConfigError(f"{where} needs source images in the rounds; set rounds.batch_source >= 1 and "
                              "rounds.source_share.start > 0, or phases: [source]")
        seen[spec.name] = seen.get(spec.name, 0) + 1
        key = spec.name if seen[spec.name] == 1 else f"{spec.name}{seen[spec.name]}"
        entries.append(WeightedTerm(key=key, weight=spec.weight, term=term, phases=tuple(dict.fromkeys(spec.phases)),
                                    start=spec.start))
    return LossTerms(entries)


def resolve_device(name: str) -> str:
    """``auto`` is cuda when a GPU is visible, else cpu; a named GPU must exist."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} is not available on this machine; set device: cpu (or auto)")
    return name


def default_callbacks() -> list[Any]:
    """metrics.jsonl first: the plots read it back."""
    callbacks: list[Any] = [MetricsWriter(), PlotWriter()]
    if TensorBoardWriter.available():
        callbacks.append(TensorBoardWriter())
    return callbacks + [ConsoleReport()]


def build_engine(cfg: RunConfig, out: str | Path) -> Engine:
    """Every object of a run, from a validated recipe."""
    data = build_data(cfg)  # missing data is named before anything else
    device = local_device(resolve_device(cfg.device))  # under torchrun: this process's GPU
    seed_everything(cfg.seed)  # the model's initial weights depend on the seed alone
    plan = build_plan(cfg, len(data.target))
    task = build_task(cfg.task, data, mine_probability=plan.mining.probability, use_07=cfg.eval.use_07)
    adapter = build_adapter(cfg)
    return Engine(
        adapter=adapter, policy=build_policy(cfg), data=data, plan=plan, task=task,
        run_dir=RunDir(Path(out)), recipe_yaml=to_yaml(cfg), seed=cfg.seed, device=device,
        callbacks=default_callbacks(), terms=build_loss_terms(cfg, adapter),
        precision=Precision(cfg.precision, device), every_steps=cfg.checkpoint.every_steps,
    )
