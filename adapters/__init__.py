"""Model adapters, installed as ``selftrain.adapters``: segmenters and detectors behind one registry.

The modules below register their adapters when this package is imported, in this fixed order;
they import the registry from ``registry.py``, never this package.
"""

from __future__ import annotations

from typing import Any

from . import classic, detection, segmentation, tiny_frcnn  # noqa: F401  (registration)
from .registry import ADAPTERS


def create_adapter(name: str, **kwargs: Any) -> Any:
    """Build a registered adapter by name; an unknown name lists the registered ones."""
    return ADAPTERS.get(name)(**kwargs)


__all__ = ["ADAPTERS", "create_adapter"]
