"""Plain training pieces the engine composes: optimisers, schedules, batch streams, steps, evaluation."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from .metrics import ConfusionMatrix
from .tta import TestTimeAugment
from .progress import progress


OPTIMISERS = ("sgd", "adam", "adamw")


@dataclass(frozen=True)
class OptimSpec:
    name: str = "sgd"
    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    head_lr_mult: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)  # adam / adamw


def parameter_groups(adapter: Any, head_lr_mult: float = 1.0) -> list[dict[str, Any]]:
    """The adapter's parameters as optimiser groups: one, or with ``head_lr_mult != 1`` the body and
    the head (``adapter.head_parameters()``), the head's ``lr_mult`` = ``head_lr_mult`` (DeepLab-v2
    and AdaptSegNet: 10 for the ASPP classifier). A model without a head raises ValueError."""
    params = list(adapter.parameters())
    if head_lr_mult == 1.0:
        return [{"params": params}]
    head = adapter.head_parameters() if hasattr(adapter, "head_parameters") else None
    if not head:
        raise ValueError(f"optim.head_lr_mult is {head_lr_mult} but this model has no separate head; set it to 1")
    ids = {id(p) for p in head}
    return [{"params": [p for p in params if id(p) not in ids]}, {"params": head, "lr_mult": head_lr_mult}]


def make_optimizer(params, spec: OptimSpec, lr: float | None = None) -> torch.optim.Optimizer:
    """``params``: tensors or groups from :func:`parameter_groups`; a group's ``lr_mult`` scales ``lr``."""
    lr = spec.lr if lr is None else lr
    params = list(params)
    if params and isinstance(params[0], dict):
        params = [{**g, "lr": lr * g.get("lr_mult", 1.0)} for g in params]
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    if spec.name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(spec.betas), weight_decay=spec.weight_decay)
    if spec.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(spec.betas), weight_decay=spec.weight_decay)
    raise ValueError(f"unknown optimiser {spec.name!r}; choose {', '.join(OPTIMISERS)}")


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """``constant``, ``poly`` (power 0.9, DeepLab), ``step`` (x0.1 at 2/3 and 5/6 of the steps: SSD's
    80k/100k of 120k) or ``onecycle`` over ``steps`` steps."""
    if kind == "onecycle":
        max_lr = [g["lr"] for g in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=max(steps, 2))
    if kind == "step":
        milestones = [round(steps * 2 / 3), round(steps * 5 / 6)]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    if kind == "poly":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: (1 - min(i, steps) / max(steps, 1)) ** 0.9)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator for samplers."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def batches(dataset: Dataset, batch_size: int, generator: torch.Generator, num_workers: int = 0,
            collate_fn: Callable[[list], dict] | None = None) -> Iterator[dict]:
    """An endless stream of shuffled batches (a new permutation every pass)."""
    sampler = RandomSampler(dataset, generator=generator)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        drop_last=len(dataset) >= batch_size, collate_fn=collate_fn or collate)
    while True:
        yield from loader


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "label": torch.stack([s["label"] for s in samples]),
        "id": [s["id"] for s in samples],
    }


def check_finite(losses: dict[str, torch.Tensor], step: int) -> None:
    """Stop on a non-finite loss, printing every component (torchvision references do the same)."""
    if not all(torch.isfinite(v).all() for v in losses.values()):
        shown = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
        raise FloatingPointError(f"non-finite loss at step {step}: {shown}")


def train_steps(
    *, step_fn: Callable[[], dict[str, torch.Tensor]], optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int, desc: str,
    after_step: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Run ``steps`` optimiser steps; ``step_fn`` returns named losses; ``after_step(i)`` runs after each
    optimiser step (the mean teacher's EMA update). Returns the losses' running means."""
    sums: dict[str, float] = {}
    for step in progress(range(steps), desc=desc, unit="step"):
        losses = step_fn()
        check_finite(losses, step)
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        scheduler.step()
        if after_step is not None:
            after_step(step)
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
    return {k: v / max(steps, 1) for k, v in sums.items()}


@torch.no_grad()
def evaluate(adapter, dataset: Dataset, *, num_classes: int, ignore_index: int, batch_size: int,
             device: torch.device, desc: str = "evaluate", tta: TestTimeAugment | None = None) -> dict[str, Any]:
    """mIoU, per-class IoU and pixel accuracy of ``adapter`` on a labelled data set (``tta``: multi-scale/flip views)."""
    tta = tta or TestTimeAugment()
    cm = ConfusionMatrix(num_classes, ignore_index)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    for batch in progress(loader, desc=desc, unit="batch"):
        pred = tta.predict(adapter, batch["image"].to(device)).logits.argmax(1).cpu()
        cm.update(pred, batch["label"])
    iou = cm.iou()
    return {"miou": float(np.nanmean(iou)) * 100, "iou": [None if math.isnan(v) else v * 100 for v in iou],
            "accuracy": cm.accuracy() * 100}
