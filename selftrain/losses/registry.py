"""The registry of extra loss terms (``selftrain list losses``)."""

from __future__ import annotations

from ..registry import Registry

LOSSES: Registry = Registry("loss")
