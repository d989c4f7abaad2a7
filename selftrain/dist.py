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
from typing import Any

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


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (int64 counts stay exact) and return it."""
    if active():
        td.all_reduce(tensor, op=td.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if active():
        td.all_reduce(tensor, op=td.ReduceOp.MAX)
    return tensor


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
