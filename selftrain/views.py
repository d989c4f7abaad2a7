"""``selftrain labels show``: one image (or a contact sheet) with its pseudo-labels and ground truth.

The images come from the run's own resolved recipe (``config.yaml``), so the target set must
still be where the run read it; pseudo-labels are stored in the order of that data set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .checkpoint import RunDir
from .errors import UserError
from .inspect import open_round_of, open_run, run_recipe
from .overlay import Boxes, Panel, box_captions, overlay, palette_for, resize_labels, save_figure
from .store import RoundReader


def target_dataset(run: RunDir) -> tuple[Any, list[str]]:
    """The run's target training set (labels hidden, ground truth via ``ground_truth(i)``) and class names."""
    from .build import build_target_dataset

    return build_target_dataset(run_recipe(run))


def pick_indices(n: int, *, index: int | None, image_id: str | None, grid: int | None,
                 reader: RoundReader) -> list[int]:
    """Which images to draw: one by id or index, or ``grid`` images (from ``index``, else spread evenly)."""
    if image_id is not None:
        try:
            return [reader.index_of(image_id)]
        except KeyError as exc:
            raise UserError(f"{exc.args[0]}; list the ids with h5py or use --index") from None
    if index is not None and not 0 <= index < n:
        raise UserError(f"--index {index} is out of range: round {reader.meta['round']} has {n} images (0..{n - 1})")
    if grid is None:
        return [index or 0]
    if grid < 1:
        raise UserError(f"--grid {grid} must be at least 1")
    if index is not None:
        return list(range(index, min(n, index + grid)))
    return sorted(set(np.linspace(0, n - 1, min(grid, n)).round().astype(int).tolist()))


def show_labels(path: str | Path, round_index: int, out_png: str | Path, *, index: int | None = None,
                image_id: str | None = None, grid: int | None = None) -> Path:
    """Write a PNG: per image, the image, its pseudo-labels of ``round_index`` and the ground truth."""
    run = open_run(path)
    with open_round_of(run, round_index) as reader:
        indices = pick_indices(len(reader), index=index, image_id=image_id, grid=grid, reader=reader)
        dataset, class_names = target_dataset(run)
        _check_alignment(dataset, reader, indices)
        palette = palette_for(class_names)
        draw = _segmentation_row if reader.task == "segmentation" else _detection_row
        rows, present = [], set()
        for i in indices:
            row, classes = draw(dataset, reader, i, palette, class_names)
            rows.append(row)
            present |= classes
        title = f"round {round_index} ({reader.meta.get('policy')}, portion {float(reader.meta.get('portion', 0)):.2f})"
        return save_figure(rows, out_png, palette=palette, class_names=class_names,
                           legend_classes=sorted(present), title=title)


def _check_alignment(dataset: Any, reader: RoundReader, indices: Sequence[int]) -> None:
    if len(dataset) != len(reader):
        raise UserError(f"the run's target set now holds {len(dataset)} images but round {reader.meta['round']} "
                        f"labelled {len(reader)}; restore the data the run used")
    for i in indices:
        sample_id = str(dataset[i]["id"])
        if sample_id != reader.image_ids[i]:
            raise UserError(f"image {i} of the target set is {sample_id!r} but the round labelled "
                            f"{reader.image_ids[i]!r}; restore the data the run used")


def _segmentation_row(dataset, reader: RoundReader, i: int, palette: np.ndarray, class_names):
    from .data.datasets import to_image

    image = to_image(dataset[i]["image"])
    ignore = int(reader.meta["ignore_index"])
    labels = resize_labels(reader.labels(i), image.shape[:2])
    row = [Panel(image, reader.image_ids[i]), Panel(overlay(image, labels, palette, ignore), "pseudo-labels")]
    classes = set(np.unique(labels[labels != ignore]).tolist())
    gt = dataset.ground_truth(i) if hasattr(dataset, "ground_truth") else None
    if gt is not None:
        gt = resize_labels(np.asarray(gt), image.shape[:2])
        row.append(Panel(overlay(image, gt, palette, ignore), "ground truth"))
        classes |= set(np.unique(gt[gt != ignore]).tolist())
    return row, {int(c) for c in classes if int(c) < len(class_names)}


def _detection_row(dataset, reader: RoundReader, i: int, palette: np.ndarray, class_names):
    sample = dataset[i]
    image = (sample["image"].permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
    found = reader.boxes(i)
    captions = box_captions(class_names, found["labels"], found["scores"], found["srrs"])
    row = [Panel(image, f"{reader.image_ids[i]}: {len(found['labels'])} pseudo-boxes",
                 Boxes(found["boxes"], found["labels"], captions))]
    classes = {int(c) - 1 for c in found["labels"]}
    gt = dataset.ground_truth(i) if hasattr(dataset, "ground_truth") else None
    if gt is not None:
        row.append(Panel(image, "ground truth", Boxes(np.asarray(gt["boxes"]), np.asarray(gt["labels"]),
                                                      box_captions(class_names, gt["labels"]))))
        classes |= {int(c) - 1 for c in gt["labels"]}
    return row, classes
