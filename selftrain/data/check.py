"""``selftrain data check``: build a recipe's data sets, check their labels, count class frequencies.

Construction already refuses a missing folder, an image without its label file and an empty split;
this module then reads the labels (not the images, where the data set offers ``label(i)``) and
reports, per split, how many images there are and which share of the labelled pixels each class
holds. Labels outside ``[0, num_classes)`` are errors, as in a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import RunConfig
from ..errors import DataError
from ..progress import progress
from . import build_split, class_names
from .datasets import check_label


@dataclass
class SplitReport:
    """One data set of the recipe. ``counts``: int64 [C] labelled pixels per class."""

    role: str
    name: str
    images: int
    labelled: int
    ignored: int
    counts: np.ndarray

    @property
    def shares(self) -> np.ndarray:
        """float64 [C]: each class's share of the labelled pixels (NaN when none were labelled)."""
        total = self.counts.sum()
        return self.counts / total if total else np.full(len(self.counts), np.nan)


@dataclass
class DataReport:
    class_names: list[str]
    splits: list[SplitReport]


def read_label(dataset: Any, index: int) -> np.ndarray | None:
    """Ground truth of image ``index`` by the cheapest path the data set offers; None when it has none."""
    if hasattr(dataset, "label"):
        return dataset.label(index)
    if hasattr(dataset, "ground_truth"):
        return dataset.ground_truth(index)
    return dataset[index]["label"].numpy() if getattr(dataset, "with_labels", True) else None


def count_classes(dataset: Any, *, role: str, name: str, num_classes: int, ignore_index: int,
                  limit: int | None = None) -> SplitReport:
    """Pixels per class over the first ``limit`` images (all by default) of ``dataset``."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    counts, labelled, ignored = np.zeros(num_classes, dtype=np.int64), 0, 0
    for i in progress(range(n), desc=f"{role}: labels", unit="img"):
        label = read_label(dataset, i)
        if label is None:
            continue
        label = check_label(np.asarray(label), num_classes, ignore_index, f"{role} image {i}")
        keep = label != ignore_index
        counts += np.bincount(label[keep].ravel().astype(np.int64), minlength=num_classes)[:num_classes]
        labelled, ignored = labelled + 1, ignored + int(label.size - keep.sum())
    return SplitReport(role=role, name=name, images=len(dataset), labelled=labelled, ignored=ignored, counts=counts)


def check_data(cfg: RunConfig, *, limit: int | None = None) -> DataReport:
    """Build source, target and target val as a run would, and count classes over their labels.

    The target is built without labels (as in a run); its ground truth is still counted when the
    files exist. ``limit``: count only the first N images of each split (all are still built).
    """
    specs = [("data.source", cfg.data.source, True), ("data.target", cfg.data.target, False),
             ("data.target_val", cfg.data.target_val, True)]
    splits, names = [], None
    for role, spec, with_labels in specs:
        if spec is None:
            continue
        dataset = build_split(spec, cfg, with_labels=with_labels)
        if len(dataset) == 0:
            raise DataError(f"{role} holds no images; point it at a non-empty data set")
        names = names or class_names(cfg, dataset)
        splits.append(count_classes(dataset, role=role, name=spec.name, num_classes=cfg.data.num_classes,
                                    ignore_index=cfg.data.ignore_index, limit=limit))
    return DataReport(class_names=list(names or []), splits=splits)


def format_report(report: DataReport) -> str:
    """Two plain-text tables: images per data set, then each class's pixel share (%) per data set."""
    lines = [f"{'data set':<17}{'name':<18}{'images':>8}{'labelled':>10}{'ignored px':>12}"]
    for s in report.splits:
        lines.append(f"{s.role:<17}{s.name:<18}{s.images:>8}{s.labelled:>10}{s.ignored:>12}")
    roles = [s.role.removeprefix("data.") for s in report.splits]
    lines += ["", f"{'class (% of labelled pixels)':<30}" + "".join(f"{r:>12}" for r in roles)]
    for c, name in enumerate(report.class_names):
        cells = [f"{100 * s.shares[c]:>12.2f}" if s.labelled and s.counts.sum() else f"{'-':>12}"
                 for s in report.splits]
        lines.append(f"{name:<30}" + "".join(cells))
    absent = [n for c, n in enumerate(report.class_names) if all(s.counts[c] == 0 for s in report.splits)]
    if absent:
        lines += ["", f"no labelled pixel in any data set: {', '.join(absent)}"]
    return "\n".join(lines)
