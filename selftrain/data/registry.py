"""The data-set registries. The modules that fill them are imported, in a fixed list, by
``selftrain/data/__init__.py``; this module imports none of them."""

from __future__ import annotations

from torch.utils.data import Dataset

from ..registry import Registry

DATASETS: Registry[Dataset] = Registry("dataset", task="segmentation")
DET_DATASETS: Registry[Dataset] = Registry("detection data set", task="detection")
