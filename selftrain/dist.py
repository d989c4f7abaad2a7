"""Rank, world size and reductions over ``torch.distributed``; every function is a no-op in one process.

Processes are started by torchrun (``torchrun --nproc_per_node N -m selftrain run RECIPE``), which
sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address; :func:`init_from_env`
joins that group (gloo on the CPU, NCCL on CUDA). Code asks :func:`is_main` before it writes a
file or the console, and reduces through the helpers below, so one process is the case N = 1
(after detectron2's ``comm.py`` and composer's ``dist``).
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as td

TIMEOUT = datetime.timedelta(seconds=600)  # a collective no peer joins fails after this, never hangs


def active() -> bool:
    """True inside an initialised process group of more than one process."""
    return td.is_available() and td.is_initialized() and td.get_world_size() > 1


def rank() -> int:
    return td.get_rank() if active() else 0


def world_size() -> int:
    return td.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """True when torchrun started this process as one of several (``WORLD_SIZE`` > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def local_device(device: str) -> str:
    """``cuda`` becomes this process's GPU (``cuda:LOCAL_RANK``) under torchrun; other devices stay."""
    if device == "cuda" and launched():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def init_from_env(device: str) -> None:
    """Join torchrun's process group once: NCCL for CUDA devices, gloo otherwise."""
    if not launched() or td.is_initialized():
        return
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(local_device(device)))
    td.init_process_group(backend=backend, timeout=TIMEOUT)


def shard(n: int, r: int | None = None, w: int | None = None) -> range:
    """Rank ``r``'s contiguous share of ``range(n)`` out of ``w`` (default: this process's group):
    exact, no padding, sizes differ by at most one.

    ``DistributedSampler`` pads with duplicates, which would count some images twice in the
    threshold statistics; these shards cover every index exactly once, in rank order.
    """
    r = rank() if r is None else r
    w = world_size() if w is None else w
    return range(r * n // w, (r + 1) * n // w)


def _on_backend(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` where the backend can reduce it: NCCL reduces CUDA tensors only, gloo either."""
    if tensor.device.type == "cpu" and td.get_backend() == "nccl":
        return tensor.to(torch.device("cuda", torch.cuda.current_device()))
    return tensor


def _reduce(tensor: torch.Tensor, op: Any) -> torch.Tensor:
    if active():
        work = _on_backend(tensor)
        td.all_reduce(work, op=op)
        if work is not tensor:
            tensor.copy_(work)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (int64 counts stay exact) and return it."""
    return _reduce(tensor, td.ReduceOp.SUM)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    return _reduce(tensor, td.ReduceOp.MAX)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in one process."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    td.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if active():
        td.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on one of them (a stop decided together)."""
    if not active():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    return bool(all_reduce_max(t).item())


def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` (the same shape on every rank) stacked in rank order: [W, *shape]."""
    if not active():
        return tensor.unsqueeze(0)
    work = _on_backend(tensor.contiguous())
    out = [torch.empty_like(work) for _ in range(world_size())]
    td.all_gather(out, work)
    return torch.stack(out).to(tensor.device)


BUCKET_BYTES = 32 * 2**20  # gradients are reduced in flat buckets of at most this size (one per dtype and device)


def average_gradients(params: Iterable[torch.Tensor]) -> None:
    """Replace each parameter's gradient by its mean over ranks, in place (a no-op in one process).

    A parameter that has a gradient on some rank but not on another counts as a zero gradient
    there; one without a gradient on every rank keeps ``grad = None``, so the optimiser skips it
    (weight decay and momentum included) exactly as it does in one process. Gradients travel in
    flat buckets (:data:`BUCKET_BYTES`), one all-reduce each. The loss terms' discriminators call
    this for their own parameters when they step outside the step runner.
    """
    if not active():
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int64)
    has = all_reduce_max(has).bool().tolist()
    for p, any_grad in zip(params, has):
        if any_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    for bucket in _buckets([p.grad for p, g in zip(params, has) if g]):
        flat = _reduce(torch.cat([g.reshape(-1) for g in bucket]), td.ReduceOp.SUM)
        flat /= world_size()
        for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
            g.copy_(part.view_as(g))


def _buckets(tensors: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """``tensors`` grouped by dtype and device, in order, into lists of at most BUCKET_BYTES each."""
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for t in group:
            if bucket and size + t.numel() * t.element_size() > BUCKET_BYTES:
                yield bucket
                bucket, size = [], 0
            bucket.append(t)
            size += t.numel() * t.element_size()
        if bucket:
            yield bucket


def broadcast_tensors(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` (the same list on every rank) with rank ``src``'s values, in place."""
    if not active():
        return
    for bucket in _buckets(list(tensors)):
        flat = _on_backend(torch.cat([t.detach().reshape(-1) for t in bucket]))
        td.broadcast(flat, src=src)
        with torch.no_grad():
            for t, part in zip(bucket, flat.split([t.numel() for t in bucket])):
                t.copy_(part.view_as(t))


def stopped_everywhere(exc: BaseException) -> BaseException:
    """Mark ``exc`` as raised on every rank from a decision taken together (:func:`any_rank`): the
    command line then prints it once, on rank 0, and every rank exits with the same code."""
    exc.selftrain_everywhere = True  # type: ignore[attr-defined]
    return exc


def raised_everywhere(exc: BaseException) -> bool:
    return bool(getattr(exc, "selftrain_everywhere", False))


def shard_of(dataset: Any, batch_size: int = 1) -> Any:
    """This rank's contiguous shard of the whole ``batch_size`` batches of ``dataset`` (a ``Subset``;
    the data set itself in one process): every rank's batches are batches of one process, so
    predictions do not depend on the number of processes; a rank may get none."""
    if not active():
        return dataset
    from torch.utils.data import Subset

    n = len(dataset)
    batches = shard(-(-n // batch_size))
    return Subset(dataset, range(min(batches.start * batch_size, n), min(batches.stop * batch_size, n)))


def launched_rank() -> int:
    """This process's global rank as torchrun set it (``RANK``), before or after joining the group."""
    try:
        return int(os.environ.get("RANK", "0")) if launched() else 0
    except ValueError:
        return 0


def launched_main() -> bool:
    """Rank 0 of a torchrun group, or a single process: the one that prints."""
    return launched_rank() == 0


_PEER_WORDS = ("connection closed", "connection reset", "broken pipe", "timed out", "gloo", "nccl")


def is_peer_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another rank went away (or timed out)."""
    if isinstance(exc, td.DistError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(w in text for w in _PEER_WORDS)
