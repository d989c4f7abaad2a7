"""Run the selftrain CLI as one torchrun worker, watched or failing on purpose (test driver).

    DDP_FAIL=MODE:RANK:STEP DDP_AUDIT=DIR python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/ddp_driver.py run RECIPE --out RUN ...

``DDP_FAIL``: at optimiser step STEP (0-based) rank RANK ``kill``s itself (SIGKILL: no handler, no
flush runs), raises a DataError (``error``: a known error, exit code 2), or makes its losses NaN
(``nan``: the non-finite guard must stop every rank together). ``DDP_AUDIT``: every rank records
in ``DIR/rank<R>.json`` the files it created, opened for writing, renamed, linked or removed under
``--out`` (Python's audit events: ``open``, ``os.rename``, ``os.replace``, ``os.link``, ``os.remove``,
``os.mkdir``). ``DDP_STATE``: when the run ends every rank writes ``DIR/state<R>.json``, a digest
of each tensor of its model, teacher and loss terms (their discriminators and optimisers).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import selftrain.engine
from selftrain import dist
from selftrain.cli import main
from selftrain.errors import DataError
from selftrain.training import StepResult

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def failing(step_function, mode: str, rank: int, at: int):
    def make(*args, **kwargs):
        step = step_function(*args, **kwargs)

        def run(i: int) -> StepResult:
            result = step(i)
            if i != at or dist.rank() != rank:
                return result
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if mode == "error":
                raise DataError(f"injected failure at step {i}; nothing to fix, the test asked for it")
            return StepResult({k: v * float("nan") for k, v in result.losses.items()}, result.batch)

        return run

    return make


def audit(folder: Path, report: Path) -> None:
    """Record this process's writes under ``folder`` into ``report`` when it exits."""
    root, writes = os.path.abspath(folder), []

    def inside(path) -> bool:
        return isinstance(path, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(path)).startswith(root)

    def hook(event: str, args: tuple) -> None:
        if event == "open" and inside(args[0]):
            mode, flags = args[1], args[2]
            if (mode is not None and any(c in mode for c in "wax+")) or (mode is None and flags & _WRITE_FLAGS):
                writes.append(["open", os.fsdecode(args[0])])
        elif event in ("os.rename", "os.replace", "os.link", "os.remove", "os.mkdir") and inside(args[0]):
            writes.append([event, os.fsdecode(args[0])])

    sys.addaudithook(hook)
    atexit.register(lambda: report.write_text(json.dumps(writes)))


def digests(state) -> dict[str, str]:
    """``{path: sha1 of the tensor's bytes}`` over a nested state dict."""
    out = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}/{i}", v)
        elif hasattr(value, "detach"):
            out[prefix] = hashlib.sha1(value.detach().cpu().contiguous().numpy().tobytes()).hexdigest()

    walk("", state)
    return out


def recording_state(run, folder: Path):
    def wrapper(engine, *args, **kwargs):
        records = run(engine, *args, **kwargs)
        state = {"model": engine.adapter.state_dict(), **engine._carried()}
        (folder / f"state{os.environ.get('RANK', '0')}.json").write_text(json.dumps(digests(state)))
        return records

    return wrapper


if __name__ == "__main__":
    if "DDP_FAIL" in os.environ:
        mode, rank, at = os.environ["DDP_FAIL"].split(":")
        selftrain.engine.step_function = failing(selftrain.engine.step_function, mode, int(rank), int(at))
    if "DDP_AUDIT" in os.environ:
        out = Path(sys.argv[sys.argv.index("--out") + 1])
        audit(out, Path(os.environ["DDP_AUDIT"]) / f"rank{os.environ.get('RANK', '0')}.json")
    if "DDP_STATE" in os.environ:
        selftrain.engine.Engine.run = recording_state(selftrain.engine.Engine.run, Path(os.environ["DDP_STATE"]))
    main(args=sys.argv[1:], prog_name="selftrain")
