"""The step runner and the pieces it composes: optimisers, schedules, precision, hooks, evaluation.

One optimiser step (:class:`StepRunner`, after detectron2's ``SimpleTrainer.run_step`` and
mmengine's ``OptimWrapper``): zero the gradients; for each of ``accumulate`` micro-batches run the
step function under autocast and back-propagate its summed losses through the GradScaler; clip;
step every optimiser through the scaler; step the schedule. Hooks see the step's outputs as
arguments at ``before_step``, ``after_backward`` (once per micro-batch) and ``after_step``; the
non-finite guard and the loss averages are hooks here, the discriminators' update, the EMA teacher
and step checkpoints are hooks of their own modules. Precision lives here and nowhere else.

Data-parallel training (torchrun, :mod:`selftrain.dist`): every rank runs the same step on its
share of the step's batch, and the runner averages the gradients of every optimiser it steps (the
model's and those of hooks' ``optimizers()``) with one explicit all-reduce per optimiser step,
after the last micro-batch and before clipping and the scaler's unscale; an update that steps its
own optimiser (a loss term's discriminator) averages its gradients with
:func:`selftrain.dist.average_gradients` before it steps. An explicit average,
rather than wrapping the model in ``DistributedDataParallel``, is chosen because the adapters are
not modules that DDP can wrap (they hide torchvision's train/eval switch behind ``forward_train`` /
``predict``), the discriminators' separate backward passes and gradient accumulation would need
``no_sync`` bookkeeping, and the loss terms would see a wrapped model; what it gives up is DDP's
overlap of the all-reduce with the backward pass (the benchmark ``benchmarks/ddp_throughput.py``
measures what two processes gain). BatchNorm statistics are not synchronised during the forward
pass (each rank normalises its own share, as DDP does without SyncBatchNorm); :class:`Replicas`
broadcasts rank 0's buffers after every step so that every rank holds the same model, and rank 0's
parameters when a phase starts. In one process all of this is a no-op.
"""

from __future__ import annotations

import contextlib
import math
import random
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import dist
from .metrics import ConfusionMatrix
from .progress import progress
from .tta import TestTimeAugment
from .types import StepBatch

OPTIMISERS = ("sgd", "adam", "adamw")
PRECISIONS = ("fp32", "bf16", "fp16")
RANK_SEED_STRIDE = 104_729  # seed_everything(per_rank=True): rank r's process generators start at seed + r x this
DIVERGENCE_FACTOR = 1e3  # FiniteGuard: a loss over 1000 x max(its running median, 1) stops the phase


@dataclass(frozen=True)
class OptimSpec:
    """An optimiser and how steps use it: ``clip_grad_norm`` (None: off) caps the global gradient
    norm; ``accumulate`` micro-batches make one step (effective batch = batch size x accumulate);
    ``divergence_factor`` is :class:`FiniteGuard`'s (None: stop on non-finite losses only)."""

    name: str = "sgd"
    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    head_lr_mult: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)  # adam / adamw
    clip_grad_norm: float | None = None
    accumulate: int = 1
    divergence_factor: float | None = DIVERGENCE_FACTOR  # FiniteGuard's; None: stop on non-finite losses only


def parameter_groups(adapter: Any, head_lr_mult: float = 1.0) -> list[dict[str, Any]]:
    """The adapter's parameters as optimiser groups: one, or with ``head_lr_mult != 1`` the body and
    the head (``adapter.head_parameters()``), the head's ``lr_mult`` = ``head_lr_mult`` (DeepLab-v2
    and AdaptSegNet: 10 for the ASPP classifier). A model without a head raises ValueError."""
    params = list(adapter.parameters())
    if head_lr_mult == 1.0:
        return [{"params": params}]
    head = adapter.head_parameters()
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


@dataclass(frozen=True)
class LRSchedule:
    """A phase's learning-rate schedule: ``name`` as :func:`make_scheduler` takes it; for ``step``,
    ``milestones`` (optimiser steps at which the rate is multiplied by ``gamma``; None: 2/3 and 5/6
    of the phase's steps, SSD's 80k/100k of 120k). The Faster R-CNN papers (DA Faster R-CNN, HTCN,
    iFAN) drop once, x0.1 at 50k of 70k: ``LRSchedule("step", (50000,))``. A milestone at or past
    the phase's last step never fires."""

    name: str = "poly"
    milestones: tuple[int, ...] | None = None
    gamma: float = 0.1

    def build(self, optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
        if self.name == "onecycle":
            max_lr = [g["lr"] for g in optimizer.param_groups]
            return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=max(steps, 2))
        if self.name == "step":
            milestones = self.milestones or (round(steps * 2 / 3), round(steps * 5 / 6))
            return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=self.gamma)
        if self.name == "poly":
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: (1 - min(i, steps) / max(steps, 1)) ** 0.9)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str | LRSchedule,
                   steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """``constant``, ``poly`` (power 0.9, DeepLab), ``step`` (x0.1 at 2/3 and 5/6 of the steps: SSD's
    80k/100k of 120k, or an :class:`LRSchedule`'s milestones and gamma) or ``onecycle`` over ``steps`` steps."""
    return (kind if isinstance(kind, LRSchedule) else LRSchedule(kind)).build(optimizer, steps)


def lr_factor(scheduler: torch.optim.lr_scheduler.LRScheduler) -> float:
    """The learning rate the schedule sets now over the one it was given (first parameter group):
    1 for ``constant``, falling to 0 for ``poly``, ``gamma`` after a milestone of ``step``; for
    ``onecycle`` relative to its peak; 1 when the given rate is 0. Loss-term optimisers with
    ``schedule: follow`` take it."""
    group = scheduler.optimizer.param_groups[0]
    nominal = group.get("max_lr", scheduler.base_lrs[0])
    return group["lr"] / nominal if nominal else 1.0


def seed_everything(seed: int, *, per_rank: bool = False) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator for samplers (seeded with ``seed``).

    ``per_rank`` (a training phase): under torchrun the process generators, which augment the
    samples, take ``seed + RANK_SEED_STRIDE * rank`` so that the ranks' shares are not augmented
    alike; the returned generator, which draws the batches' permutations, stays the same on every
    rank. In one process nothing changes."""
    process = seed + RANK_SEED_STRIDE * dist.rank() if per_rank else seed
    random.seed(process)
    np.random.seed(process % 2**32)
    torch.manual_seed(process)
    return torch.Generator().manual_seed(seed)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "label": torch.stack([s["label"] for s in samples]),
        "id": [s["id"] for s in samples],
    }


# --------------------------------------------------------------------------- precision


@dataclass(frozen=True)
class Precision:
    """``fp32``, ``bf16`` or ``fp16`` for every forward pass on ``device`` (training, evaluation,
    pseudo-labels): autocast to the half type, and for fp16 a GradScaler on the backward passes.
    Losses, costs and statistics are computed in float32 from the logits whatever the setting."""

    name: str = "fp32"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.name not in PRECISIONS:
            raise ValueError(f"unknown precision {self.name!r}; choose {', '.join(PRECISIONS)}")

    @property
    def device_type(self) -> str:
        return torch.device(self.device).type

    def autocast(self) -> ContextManager[Any]:
        if self.name == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.name == "bf16" else torch.float16
        return torch.autocast(device_type=self.device_type, dtype=dtype)

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")


# --------------------------------------------------------------------------- the step runner


@dataclass(frozen=True)
class StepResult:
    """One forward of a training step: its named losses (weighted; their sum is back-propagated) and
    the step's batch outputs for hooks that learn from them (the loss terms' discriminators)."""

    losses: dict[str, torch.Tensor]
    batch: StepBatch | None = None


class HookBase:
    """A step hook; override what you need. ``after_backward`` runs once per micro-batch, with the
    runner for its ``backward`` and ``autocast``; ``after_step`` gets the step's losses (detached,
    float64, averaged over micro-batches). ``optimizers()`` are stepped with the model's, through
    the same GradScaler. ``state_dict`` goes into step checkpoints."""

    def before_step(self, step: int) -> None:
        pass

    def after_backward(self, runner: StepRunner, step: int, result: StepResult) -> None:
        pass

    def after_step(self, step: int, losses: dict[str, torch.Tensor]) -> None:
        pass

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class StepRunner:
    """Runs optimiser steps of ``step_fn(step) -> StepResult`` with ``hooks`` (in order).

    Args:
        optimizer, scheduler: the model's; the scheduler steps once per optimiser step.
        precision: autocast for the forward passes and the GradScaler for the backward ones.
        clip_grad_norm: cap on the model's global gradient norm (unscaled first), or None.
        accumulate: micro-batches per step; each micro-batch's loss is divided by it.
    """

    def __init__(self, *, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                 precision: Precision = Precision(), clip_grad_norm: float | None = None, accumulate: int = 1,
                 hooks: Sequence[HookBase] = ()) -> None:
        if accumulate < 1:
            raise ValueError(f"accumulate must be >= 1, got {accumulate}")
        self.optimizer, self.scheduler, self.precision = optimizer, scheduler, precision
        self.clip_grad_norm, self.accumulate, self.hooks = clip_grad_norm, accumulate, list(hooks)
        self.scaler = precision.scaler()
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        self.last_losses: dict[str, torch.Tensor] = {}  # the last step's, detached; read only for progress records
        self.desc = ""  # the phase being run, for messages (``run``'s ``desc``)

    def autocast(self) -> ContextManager[Any]:
        return self.precision.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate one micro-batch's loss through the scaler (divided by ``accumulate``)."""
        self.scaler.scale(loss / self.accumulate).backward()

    def run(self, step_fn: Callable[[int], StepResult], *, steps: int, start: int = 0, desc: str) -> None:
        """Steps ``start`` .. ``steps - 1``."""
        self.desc = desc
        for step in progress(range(start, steps), desc=desc, unit="step", total=steps, initial=start,
                             losses=self._last_loss_values):
            self.last_losses = self.step(step_fn, step)

    def _last_loss_values(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.last_losses.items()}  # the host sync, once per record

    def step(self, step_fn: Callable[[int], StepResult], step: int) -> dict[str, torch.Tensor]:
        """One optimiser step; returns its losses (detached, float64, averaged over micro-batches)."""
        optimizers = [self.optimizer] + [o for h in self.hooks for o in h.optimizers()]
        for h in self.hooks:
            h.before_step(step)
        losses: dict[str, torch.Tensor] = {}
        for micro in range(self.accumulate):
            with self.autocast():
                result = step_fn(step)
            if micro == 0:  # after the forward pass, as detectron2's SimpleTrainer: on the CPU the
                for opt in optimizers:  # freed gradients' memory then goes to this backward, not the forward
                    opt.zero_grad(set_to_none=True)
            self.backward(sum(result.losses.values()))
            for h in self.hooks:
                h.after_backward(self, step, result)
            for k, v in result.losses.items():
                v = v.detach().double()
                losses[k] = losses[k] + v / self.accumulate if k in losses else v / self.accumulate
        dist.average_gradients(_unique(p for opt in optimizers for g in opt.param_groups for p in g["params"]))
        if self.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self._params, self.clip_grad_norm)
        for opt in optimizers:
            self.scaler.step(opt)
        self.scaler.update()
        self.scheduler.step()
        for h in self.hooks:
            h.after_step(step, losses)
        return losses

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "hooks": [h.state_dict() for h in self.hooks]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        for h, s in zip(self.hooks, state["hooks"], strict=True):
            h.load_state_dict(s)


def _unique(params: Any) -> list[torch.Tensor]:
    """``params`` in order, each once (a tensor may sit in two optimisers' groups)."""
    seen: dict[int, torch.Tensor] = {}
    for p in params:
        seen.setdefault(id(p), p)
    return list(seen.values())


# --------------------------------------------------------------------------- generic hooks


class Replicas(HookBase):
    """Keeps every rank's copy of ``owners`` (the adapter, the loss terms: objects with
    ``state_dict()`` and ``parameters()``) identical under torchrun: rank 0's parameters and buffers
    are broadcast when the hook is made (the start of a phase), and its buffers (BatchNorm running
    statistics, which each rank updates from its own share of the batch) after every optimiser
    step. Parameters need no broadcast after a step: the averaged gradients and the same optimiser
    keep them equal. A no-op in one process."""

    def __init__(self, owners: Sequence[Any]) -> None:
        self.owners = list(owners)
        dist.broadcast_tensors(self._tensors(buffers_only=False))

    def _tensors(self, buffers_only: bool) -> list[torch.Tensor]:
        out = []
        for owner in self.owners:
            params = {p.data_ptr() for p in owner.parameters()}
            out += [t for t in owner.state_dict().values() if isinstance(t, torch.Tensor)
                    and not (buffers_only and t.data_ptr() in params)]
        return out

    def after_step(self, step: int, losses: dict[str, torch.Tensor]) -> None:
        dist.broadcast_tensors(self._tensors(buffers_only=True))


class FiniteGuard(HookBase):
    """Stop a phase on a non-finite or diverged loss, before the optimiser steps, with every
    component, the step and the phase in the message (the torchvision references stop on a
    non-finite loss the same way). One host sync per micro-batch: the components are copied to the
    host together and checked there. Under torchrun every rank gathers every rank's components (one
    all-gather) and decides on the same numbers, so all ranks stop together with the same message,
    naming the rank whose loss was non-finite; divergence is judged on the mean over ranks (the
    loss of the global batch).

    Divergence: a component whose magnitude exceeds ``divergence_factor`` x its running level, the
    median of its last ``window`` values floored at ``floor``. A median ignores the odd hard batch
    that an average would follow; the floor keeps a converged loss (1e-4) from turning a normal
    batch (0.5) into a thousandfold jump, since the task losses are means of per-sample terms of
    order one (cross-entropy of a random model is log C). With the defaults a loss stops the phase
    when it passes 1000 x max(its median, 1): SGD at a learning rate of 1e6 reaches 1e16 in a round,
    while no shipped recipe comes near. A component is checked from its second value on (the first
    sets its level), so a few-step phase is covered too. ``divergence_factor`` None: non-finite only.
    """

    def __init__(self, divergence_factor: float | None = DIVERGENCE_FACTOR, *, window: int = 50,
                 floor: float = 1.0) -> None:
        if divergence_factor is not None and divergence_factor <= 1:
            raise ValueError(f"divergence_factor must be > 1 (or None to check only for non-finite losses), "
                             f"got {divergence_factor}")
        self.divergence_factor, self.window, self.floor = divergence_factor, window, floor
        self.history: dict[str, deque[float]] = {}

    def after_backward(self, runner: StepRunner, step: int, result: StepResult) -> None:
        names = list(result.losses)
        if not names:
            return
        values = torch.stack([v.detach().float().reshape(()) for v in result.losses.values()])
        per_rank = dist.all_gather_tensor(values).tolist()  # [W][K]: every rank decides on the same numbers
        where = f"at step {step} ({runner.desc})" if runner.desc else f"at step {step}"
        for r, row in enumerate(per_rank):
            if not all(math.isfinite(v) for v in row):
                on = f" on rank {r}" if len(per_rank) > 1 else ""
                raise dist.stopped_everywhere(FloatingPointError(
                    f"non-finite loss {where}{on}: {_shown(dict(zip(names, row)))}"))
        losses = dict(zip(names, per_rank[0] if len(per_rank) == 1 else
                          [math.fsum(col) / len(per_rank) for col in zip(*per_rank)]))
        if self.divergence_factor is not None:
            try:
                self._check(losses, where)
            except FloatingPointError as exc:
                raise dist.stopped_everywhere(exc) from None
        for k, v in losses.items():
            self.history.setdefault(k, deque(maxlen=self.window)).append(v)

    def level(self, name: str) -> float | None:
        """The running level of component ``name``: the median of its recent values, at least ``floor``."""
        seen = self.history.get(name)
        return max(statistics.median(seen), self.floor) if seen else None

    def _check(self, losses: dict[str, float], where: str) -> None:
        for k, v in losses.items():
            level = self.level(k)
            if level is not None and abs(v) > self.divergence_factor * level:
                raise FloatingPointError(
                    f"loss diverged {where}: {k}={v:.4g} is over {self.divergence_factor:g} x its running level "
                    f"{level:.4g}; losses: {_shown(losses)}")

    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = {k: deque(v, maxlen=self.window) for k, v in state.get("history", {}).items()}


def _shown(losses: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in losses.items())


class LossMeter(HookBase):
    """Running sums of named losses (float64 on the losses' device: no host sync per step)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        for k, v in losses.items():
            v = v.detach().double()
            self.sums[k] = (self.sums[k].to(v.device) if k in self.sums else 0.0) + v  # 0.0 + -0.0 = 0.0

    def after_step(self, step: int, losses: dict[str, torch.Tensor]) -> None:
        self.add(losses)

    def means(self, count: int) -> dict[str, float]:
        """Mean per step over ``count`` steps (under torchrun, also over ranks: the global batch's)."""
        if dist.active():
            names = sorted(self.sums)
            total = dist.all_reduce_sum(torch.stack([self.sums[k].double().cpu() for k in names]) if names
                                        else torch.zeros(0, dtype=torch.float64))
            return {k: float(v) / dist.world_size() / max(count, 1) for k, v in zip(names, total.tolist())}
        return {k: float(v) / max(count, 1) for k, v in self.sums.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"sums": {k: v.cpu() for k, v in self.sums.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = dict(state["sums"])


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(adapter, dataset: Dataset, *, num_classes: int, ignore_index: int, batch_size: int,
             device: torch.device, desc: str = "evaluate", tta: TestTimeAugment | None = None) -> dict[str, Any]:
    """mIoU, per-class IoU and pixel accuracy of ``adapter`` on a labelled data set (``tta``: multi-scale/flip views).

    Under torchrun each rank predicts its contiguous shard of whole batches
    (:func:`selftrain.dist.shard_of`: the batches one process makes) and the int64 confusion
    matrices are summed over ranks, so every rank returns the numbers of one process."""
    tta = tta or TestTimeAugment()
    cm = ConfusionMatrix(num_classes, ignore_index)
    loader = DataLoader(dist.shard_of(dataset, batch_size), batch_size=batch_size, shuffle=False, collate_fn=collate)
    for batch in progress(loader, desc=desc, unit="batch"):
        pred = tta.predict(adapter, batch["image"].to(device)).logits.argmax(1).cpu()
        cm.update(pred, batch["label"])
    dist.all_reduce_sum(cm.matrix)
    iou = cm.iou()
    return {"miou": float(np.nanmean(iou)) * 100, "iou": [None if math.isnan(v) else v * 100 for v in iou],
            "accuracy": cm.accuracy() * 100}
