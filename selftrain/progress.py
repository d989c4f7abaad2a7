"""Progress bars (tqdm) that stay quiet off a terminal or when the user asks for quiet."""

from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

from tqdm import tqdm

T = TypeVar("T")
_QUIET = False


def set_quiet(quiet: bool) -> None:
    global _QUIET
    _QUIET = quiet


def progress(items: Iterable[T], *, desc: str, unit: str = "it", total: int | None = None) -> Iterable[T]:
    """Wrap an iterable in a tqdm bar with rate and ETA, unless stderr is not a terminal."""
    disabled = _QUIET or not sys.stderr.isatty() or os.environ.get("SELFTRAIN_QUIET") == "1"
    return tqdm(items, desc=desc, unit=unit, total=total, disable=disabled, leave=False, dynamic_ncols=True)
