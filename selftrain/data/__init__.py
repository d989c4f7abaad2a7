"""Data sets (the embedded synthetic benchmarks, the real ones and folder layouts), transforms.

The registries live in ``registry.py``; the modules below fill them when this package is imported,
in this fixed order, and none of them imports this package or another that registers after it.
``build_split`` is the one builder for both tasks: it turns a recipe's data-set entry into a data
set of the recipe's task.
"""

from __future__ import annotations

from typing import Any

from ..config import DatasetSpec, RunConfig
from ..errors import ConfigError
from . import datasets, segsets, cityscapes, detsets, coco  # noqa: F401  (registration, in this order)
from .registry import DATASETS, DET_DATASETS
from .segsets import SYNTHIA_13, SYNTHIA_16_NAMES

REGISTRIES = {"segmentation": DATASETS, "detection": DET_DATASETS}


def build_split(spec: DatasetSpec, cfg: RunConfig, *, with_labels: bool) -> Any:
    """The data set of a recipe entry (``data.source``, ``data.target``, ``data.target_val``)."""
    other = next((t for t, reg in REGISTRIES.items() if t != cfg.task and spec.name in reg), None)
    if other is not None and spec.name not in REGISTRIES[cfg.task]:
        raise ConfigError(f"data set {spec.name} is a {other} data set but the recipe's task is {cfg.task}; pick one "
                          f"of: {', '.join(REGISTRIES[cfg.task].names())}")
    if cfg.task == "detection":
        return detsets.build_det_dataset(spec.name, root=spec.root, split=spec.split, options=spec.options,
                                         class_names=cfg.data.class_names, with_labels=with_labels)
    return datasets.build_dataset(spec.name, root=spec.root, split=spec.split, options=spec.options,
                                  num_classes=cfg.data.num_classes, ignore_index=cfg.data.ignore_index,
                                  with_labels=with_labels)


def class_names(cfg: RunConfig, dataset: Any) -> list[str]:
    """Recipe class names, else the data set's; their count must equal data.num_classes."""
    names = cfg.data.class_names or list(getattr(dataset, "class_names", []) or [])
    if not names:
        return [f"class_{i}" for i in range(cfg.data.num_classes)]
    if len(names) != cfg.data.num_classes:
        raise ConfigError(f"data.num_classes is {cfg.data.num_classes} but the source data set has {len(names)} "
                          f"classes ({', '.join(names)}); set data.num_classes: {len(names)}")
    return list(names)


# Label spaces with a published metric over a subset of their classes: the class names (as the
# recipe or data set gives them, "_" read as " ") -> {metric: class indices}.
SUBSET_METRICS = {SYNTHIA_16_NAMES: {"miou13": SYNTHIA_13}}  # SYNTHIA -> Cityscapes: mIoU* (CBST Table 2)


def subset_metrics(names: list[str]) -> dict[str, tuple[int, ...]]:
    """The subset metrics the label space of ``names`` declares (none for most)."""
    return dict(SUBSET_METRICS.get(tuple(str(n).replace("_", " ") for n in names), {}))
