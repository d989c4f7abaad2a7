"""Model adapters, installed as ``selftrain.adapters``: one registry of segmenters."""

from __future__ import annotations

from typing import Any

from selftrain.registry import Registry

ADAPTERS: Registry[Any] = Registry("adapter")

from . import segmentation  # noqa: E402,F401  (registers the segmenters)
from . import detection  # noqa: E402,F401  (registers the detectors)
from . import classic  # noqa: E402,F401  (registers the CBST-paper segmenters)


def create_adapter(name: str, **kwargs: Any) -> Any:
    """Build a registered adapter by name; an unknown name lists the registered ones."""
    return ADAPTERS.get(name)(**kwargs)


__all__ = ["ADAPTERS", "create_adapter"]
