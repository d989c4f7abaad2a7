"""Progress of long loops: a tqdm bar on a terminal, one-line records off it, nothing when quiet.

Off a terminal (a log file, ``nohup``, a cluster job) a bar would print nothing useful, so the loop
logs a record to stderr every ``SELFTRAIN_PROGRESS_SECONDS`` (default 60) and one when it ends::

    round 1: train  step 1200/5000  3.1 step/s  ETA 20m26s  loss src/ce=0.412 tgt/ce=0.301

The records go through the ``selftrain.progress`` logger, which has its own stderr handler (the
command line's handler writes the run's tables to stdout). ``SELFTRAIN_QUIET=1`` or
:func:`set_quiet` turns bars and records off.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Callable, Iterable, Iterator, Mapping, TypeVar

from tqdm import tqdm

from . import dist
from .errors import UserError

T = TypeVar("T")
_QUIET = False
DEFAULT_SECONDS = 60.0
_clock = time.monotonic  # tests swap in a fake clock

log = logging.getLogger(__name__)


class _Stderr(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (not the one at import time), as logging's last resort."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


if not log.handlers:
    _handler = _Stderr()
    _handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def set_quiet(quiet: bool) -> None:
    global _QUIET
    _QUIET = quiet


def record_seconds() -> float:
    """Seconds between two records off a terminal: ``SELFTRAIN_PROGRESS_SECONDS``, default 60."""
    raw = os.environ.get("SELFTRAIN_PROGRESS_SECONDS", "")
    try:
        seconds = float(raw) if raw.strip() else DEFAULT_SECONDS
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise UserError(f"SELFTRAIN_PROGRESS_SECONDS must be a positive number of seconds, got {raw!r}; "
                        "e.g. SELFTRAIN_PROGRESS_SECONDS=600, or unset it for one record a minute")
    return seconds


def progress(items: Iterable[T], *, desc: str, unit: str = "it", total: int | None = None, initial: int = 0,
             losses: Callable[[], Mapping[str, float]] | None = None) -> Iterable[T]:
    """Wrap ``items`` in a tqdm bar with rate and ETA, or off a terminal in periodic records.

    ``total`` (default ``len(items)``) and ``initial`` (items done before, as on a resumed run)
    count in the display; ``losses`` is called only when a record is written and returns the
    latest named losses as floats.
    """
    if _QUIET or os.environ.get("SELFTRAIN_QUIET") == "1" or not dist.is_main():
        return items  # under torchrun, rank 0 alone shows progress
    if total is None:
        try:
            total = initial + len(items)  # type: ignore[arg-type]
        except TypeError:  # a generator, an iterable data set
            pass
    if sys.stderr.isatty():
        return tqdm(items, desc=desc, unit=unit, total=total, initial=initial, leave=False, dynamic_ncols=True)
    return _records(items, desc=desc, unit=unit, total=total, initial=initial, losses=losses,
                    seconds=record_seconds())


def _records(items: Iterable[T], *, desc: str, unit: str, total: int | None, initial: int,
             losses: Callable[[], Mapping[str, float]] | None, seconds: float) -> Iterator[T]:
    """Yield ``items``; after each one, log a record once ``seconds`` have passed since the last."""
    start = last = _clock()
    done = 0

    def write(now: float, finished: bool) -> None:
        values = losses() if losses is not None else {}
        log.info("%s", format_record(desc, unit, position=initial + done, total=total, done=done,
                                     elapsed=now - start, losses=values, finished=finished))

    for item in items:
        yield item
        done += 1
        now = _clock()
        if now - last >= seconds and initial + done != total:  # the last item gets the end record
            last = now
            write(now, finished=False)
    write(_clock(), finished=True)


def format_record(desc: str, unit: str, *, position: int, total: int | None, done: int, elapsed: float,
                  losses: Mapping[str, float], finished: bool) -> str:
    """``desc  unit position/total  rate  ETA (or: done in)  loss k=v ...``; ``done`` items took ``elapsed`` s."""
    parts = [desc, f"{unit} {position}/{total}" if total is not None else f"{unit} {position}"]
    rate = done / elapsed if elapsed > 0 else 0.0
    if rate > 0:
        parts.append(f"{rate:.3g} {unit}/s" if rate >= 1 else f"{1 / rate:.3g} s/{unit}")
    if finished:
        parts.append(f"done in {duration(elapsed)}")
    elif total is not None and rate > 0:
        parts.append(f"ETA {duration((total - position) / rate)}")
    if losses:
        parts.append("loss " + " ".join(f"{k}={v:.4g}" for k, v in losses.items()))
    return "  ".join(parts)


def duration(seconds: float) -> str:
    """``42s``, ``20m26s`` or ``3h05m``."""
    s = max(int(round(seconds)), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
