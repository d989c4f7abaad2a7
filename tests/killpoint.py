"""Run the selftrain CLI and SIGKILL the process at the N-th occurrence of an event (test driver).

    python tests/killpoint.py EVENT N run RECIPE --out RUN ...

EVENT: ``step`` (an optimiser step begins), ``label`` (a batch of logits reaches the pseudo-label
cache: generation pass 1), ``store`` (a batch of pseudo-labels is written: pass 2 or an online
round's store pass), ``save`` (a checkpoint is being written: half a file is on disk), ``metrics``
(a round's metrics line has just been written, its checkpoint not yet), ``link`` (a round checkpoint
is written, ``last.pt`` not yet pointed at it), ``linked`` (``last.pt`` is, the step checkpoint not
yet removed). The kill is a real SIGKILL: no ``finally`` block, no atexit handler, no flush runs.

``hold-EVENT`` instead stops the process there: it prints ``held`` on stdout and goes on once a line
arrives on its stdin (a second process can meet the first one mid-run).
"""

from __future__ import annotations

import os
import signal
import sys

import torch

import selftrain.callbacks
import selftrain.engine
from selftrain.cli import main
from selftrain.pseudo import LogitCache
from selftrain.store import PseudoLabelWriter
from selftrain.training import StepRunner


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def hold() -> None:
    print("held", flush=True)
    sys.stdin.readline()


def counted(fn, n: int, act, before=None, after: bool = False):
    """``fn`` that runs ``act`` at its ``n``-th call: before it (after ``before``), or after it."""
    count = [0]

    def wrapper(*args, **kwargs):
        count[0] += 1
        if count[0] == n and not after:
            if before is not None:
                before(*args, **kwargs)
            act()
        result = fn(*args, **kwargs)
        if count[0] == n and after:
            act()
        return result

    return wrapper


def half_written(obj, f, *args, **kwargs):
    start = b"PK\x03\x04" + b"\0" * 512  # the start of a zip archive, as torch.save begins
    fh = f if hasattr(f, "write") else open(f, "wb")
    fh.write(start)
    fh.flush()
    os.fsync(fh.fileno())


if __name__ == "__main__":
    event, n, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    act = kill
    if event.startswith("hold-"):
        event, act = event[len("hold-"):], hold
    if event == "step":
        StepRunner.step = counted(StepRunner.step, n, act)
    elif event == "label":
        LogitCache.write = counted(LogitCache.write, n, act)
    elif event == "store":
        PseudoLabelWriter.add_segmentation_batch = counted(PseudoLabelWriter.add_segmentation_batch, n, act)
        PseudoLabelWriter.add_detection = counted(PseudoLabelWriter.add_detection, n, act)
    elif event == "save":
        torch.save = counted(torch.save, n, act, before=half_written if act is kill else None)
    elif event == "metrics":
        selftrain.callbacks.append_line = counted(selftrain.callbacks.append_line, n, act, after=True)
    elif event in ("link", "linked"):
        selftrain.engine.link_atomic = counted(selftrain.engine.link_atomic, n, act, after=event == "linked")
    else:
        raise SystemExit(f"unknown event {event!r}")
    main(args)
