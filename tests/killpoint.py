"""Run the selftrain CLI and SIGKILL the process at the N-th occurrence of an event (test driver).

    python tests/killpoint.py EVENT N run RECIPE --out RUN ...

EVENT: ``step`` (an optimiser step begins), ``label`` (a batch of logits reaches the pseudo-label
cache: generation pass 1), ``store`` (a batch of pseudo-labels is written: pass 2 or an online
round's store pass), ``save`` (a checkpoint is being written: half a file is on disk). The kill is a
real SIGKILL: no ``finally`` block, no atexit handler, no flush runs.
"""

from __future__ import annotations

import os
import signal
import sys

import torch

from selftrain.cli import main
from selftrain.pseudo import LogitCache
from selftrain.store import PseudoLabelWriter
from selftrain.training import StepRunner


def counted(fn, n: int, before=None):
    count = [0]

    def wrapper(*args, **kwargs):
        count[0] += 1
        if count[0] == n:
            if before is not None:
                before(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)

    return wrapper


def half_written(obj, f, *args, **kwargs):
    with open(f, "wb") as fh:
        fh.write(b"PK\x03\x04" + b"\0" * 512)  # the start of a zip archive, as torch.save begins
        fh.flush()
        os.fsync(fh.fileno())


if __name__ == "__main__":
    event, n, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    if event == "step":
        StepRunner.step = counted(StepRunner.step, n)
    elif event == "label":
        LogitCache.write = counted(LogitCache.write, n)
    elif event == "store":
        PseudoLabelWriter.add_segmentation_batch = counted(PseudoLabelWriter.add_segmentation_batch, n)
        PseudoLabelWriter.add_detection = counted(PseudoLabelWriter.add_detection, n)
    elif event == "save":
        torch.save = counted(torch.save, n, before=half_written)
    else:
        raise SystemExit(f"unknown event {event!r}")
    main(args)
