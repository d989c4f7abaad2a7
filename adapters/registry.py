"""The adapter registry; its entries carry ``task`` ("segmentation" or "detection"), so a recipe
that names a model of the other task is refused before the model is built."""

from __future__ import annotations

from typing import Any

from selftrain.registry import Registry

ADAPTERS: Registry[Any] = Registry("adapter")
