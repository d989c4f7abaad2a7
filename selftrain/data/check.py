"""``selftrain data check``: build a recipe's data sets, check their labels, count class frequencies.

Construction already refuses a missing folder, an image without its label file and an empty split;
this module then decodes every image (a damaged file that a run would meet only when it reaches it:
about 30 ms per 2-Mpixel PNG, so 25 min for GTA5's 24,966 frames on one core; ``--limit`` checks the
first N of each split), reads the labels and reports, per split, how many images there are and which
share of the labelled pixels each class holds. Labels outside ``[0, num_classes)`` or of another size
than their image are errors, as in a run.

Detection recipes are checked box by box (:func:`check_boxes`): every box must be finite, of positive
area, inside its image (the size of the decoded image file, or of the rendered image) and
labelled ``1..num_classes``; the report counts boxes per class, and difficult boxes apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import RunConfig
from ..errors import DataError
from ..progress import progress
from . import build_split, class_names
from .datasets import check_label, read_image


@dataclass
class SplitReport:
    """One data set of the recipe. ``counts``: int64 [C] labelled pixels (or boxes) per class;
    ``ignored``: ignored pixels (or difficult boxes)."""

    role: str
    name: str
    images: int
    labelled: int
    ignored: int
    counts: np.ndarray
    unit: str = "pixels"  # or "boxes"

    @property
    def shares(self) -> np.ndarray:
        """float64 [C]: each class's share of the labelled pixels or boxes (NaN when none were labelled)."""
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
        size = decode_image(dataset, i)
        label = read_label(dataset, i)
        if label is None:
            continue
        if size is not None and getattr(dataset, "resize", None) is None and np.shape(label) != size:
            which = f"{role} image {i} ({dataset.ids[i]})" if hasattr(dataset, "ids") else f"{role} image {i}"
            raise DataError(f"the label of {which} is {np.shape(label)[1]}x{np.shape(label)[0]} but its "
                            f"image {size[1]}x{size[0]}; labels must be the size of their image")
        label = check_label(np.asarray(label), num_classes, ignore_index, f"{role} image {i}")
        keep = label != ignore_index
        counts += np.bincount(label[keep].ravel().astype(np.int64), minlength=num_classes)[:num_classes]
        labelled, ignored = labelled + 1, ignored + int(label.size - keep.sum())
    return SplitReport(role=role, name=name, images=len(dataset), labelled=labelled, ignored=ignored, counts=counts)


def decode_image(dataset: Any, index: int) -> tuple[int, int] | None:
    """Decode image ``index`` from its file (DataError naming a damaged one); its (H, W), or None for
    a data set that renders its images."""
    image_path = getattr(dataset, "image_path", None)
    path = image_path(index) if image_path is not None else None
    return None if path is None else read_image(path, mode="RGB").shape[:2]


def rendered_size(dataset: Any, index: int) -> tuple[int, int]:
    """(H, W) of image ``index`` of a data set that renders its images in memory (no file to decode)."""
    return tuple(int(s) for s in dataset[index]["image"].shape[-2:])


def check_boxes(target: dict[str, Any], size: tuple[int, int], num_classes: int, where: str) -> np.ndarray:
    """Refuse a box that is not finite, has no area, reaches outside the ``size`` (H, W) image or has a
    label outside ``1..num_classes``. Returns the labels, int64 [M]."""
    boxes = np.asarray(target.get("boxes", np.zeros((0, 4))), dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(target.get("labels", np.zeros(0)), dtype=np.int64).reshape(-1)
    if len(labels) != len(boxes):
        raise DataError(f"{where} has {len(boxes)} boxes but {len(labels)} labels; fix its annotation")
    height, width = size
    problems = [
        (~np.isfinite(boxes).all(1), "has a coordinate that is not a number", "fix its annotation"),
        ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]), "has no area (xmax <= xmin or ymax <= ymin)",
         "fix or remove the box"),
        ((boxes[:, :2] < 0).any(1) | (boxes[:, 2] > width) | (boxes[:, 3] > height),
         f"reaches outside the {width}x{height} image", "fix the box or the image size in the annotation"),
        ((labels < 1) | (labels > num_classes), f"has a label outside 1..{num_classes}",
         "fix data.num_classes or the annotation"),
    ]
    for bad, what, fix in problems:
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            box = ", ".join(f"{v:g}" for v in boxes[k])
            raise DataError(f"box {k} ({box}; label {int(labels[k])}) of {where} {what}; {fix}")
    return labels


def count_boxes(dataset: Any, *, role: str, name: str, num_classes: int, limit: int | None = None) -> SplitReport:
    """Boxes per class over the first ``limit`` images (all by default), each box checked by :func:`check_boxes`."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    counts, labelled, difficult = np.zeros(num_classes, dtype=np.int64), 0, 0
    for i in progress(range(n), desc=f"{role}: boxes", unit="img"):
        size = decode_image(dataset, i)
        target = dataset.ground_truth(i)
        if target is None:
            continue
        where = f"{role} image {i} ({dataset.ids[i]})" if hasattr(dataset, "ids") else f"{role} image {i}"
        labels = check_boxes(target, size or rendered_size(dataset, i), num_classes, where)
        counts += np.bincount(labels - 1, minlength=num_classes)
        labelled += 1
        difficult += int(np.asarray(target.get("difficult", np.zeros(0, bool))).astype(bool).sum())
    return SplitReport(role=role, name=name, images=len(dataset), labelled=labelled, ignored=difficult,
                       counts=counts, unit="boxes")


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
        if cfg.task == "detection":
            splits.append(count_boxes(dataset, role=role, name=spec.name, num_classes=cfg.data.num_classes,
                                      limit=limit))
        else:
            splits.append(count_classes(dataset, role=role, name=spec.name, num_classes=cfg.data.num_classes,
                                        ignore_index=cfg.data.ignore_index, limit=limit))
    return DataReport(class_names=list(names or []), splits=splits)


def format_report(report: DataReport) -> str:
    """Two plain-text tables: images per data set, then each class's share (%) of the pixels or boxes
    per data set."""
    unit = report.splits[0].unit if report.splits else "pixels"
    ignored = "ignored px" if unit == "pixels" else "difficult"
    lines = [f"{'data set':<17}{'name':<18}{'images':>8}{'labelled':>10}{ignored:>12}"]
    for s in report.splits:
        lines.append(f"{s.role:<17}{s.name:<18}{s.images:>8}{s.labelled:>10}{s.ignored:>12}")
    roles = [s.role.removeprefix("data.") for s in report.splits]
    lines += ["", f"{f'class (% of labelled {unit})':<30}" + "".join(f"{r:>12}" for r in roles)]
    for c, name in enumerate(report.class_names):
        cells = [f"{100 * s.shares[c]:>12.2f}" if s.labelled and s.counts.sum() else f"{'-':>12}"
                 for s in report.splits]
        lines.append(f"{name:<30}" + "".join(cells))
    absent = [n for c, n in enumerate(report.class_names) if all(s.counts[c] == 0 for s in report.splits)]
    if absent:
        lines += ["", f"no labelled {'pixel' if unit == 'pixels' else 'box'} in any data set: {', '.join(absent)}"]
    return "\n".join(lines)
