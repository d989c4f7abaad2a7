"""COCO-format detection annotations (Lin et al., ECCV 2014, arXiv:1405.0312) as a detection data set.

One JSON file holds ``images`` (``id``, ``file_name``, ``height``, ``width``), ``annotations``
(``image_id``, ``category_id``, ``bbox`` = [x, y, width, height] in pixels, ``iscrowd``) and
``categories`` (``id``, ``name``). Each ``file_name`` is relative to an image root. A box becomes
the continuous xyxy (x, y, x + width, y + height), nothing rounded; crowd regions are flagged
difficult (VOC AP ignores them as COCO's evaluation does). Categories meet ``class_names`` by
name, never by id or position, so a file whose ids follow another order still reads right. Ids
are the file names without their extension (``leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit``).
The annotation rules of :mod:`selftrain.data.detsets` apply (skipping, clipping, dropping).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import numpy as np
import torch

from ..errors import DataError
from .datasets import read_image
from .detsets import DetectionSet, RawAnnotation, select, to_target
from .registry import DET_DATASETS


class CocoImage(NamedTuple):
    """One image record: its id (file name without extension), file, objects and size (H, W)."""

    id: str
    file: Path
    raw: RawAnnotation


def read_coco_json(path: Path, image_root: Path) -> tuple[list[CocoImage], list[str]]:
    """Images in file order and category names in id order; a malformed file is a DataError."""
    try:
        doc = json.loads(path.read_text())
        names = {int(c["id"]): str(c["name"]) for c in doc["categories"]}
        objects: dict[int, list[dict[str, Any]]] = {int(im["id"]): [] for im in doc["images"]}
        for ann in doc["annotations"]:
            objects[int(ann["image_id"])].append(ann)
        images = [_image_record(im, objects[int(im["id"])], names, image_root) for im in doc["images"]]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise DataError(f"cannot read COCO annotations {path} ({exc.__class__.__name__}: {exc}); "
                        "fix or replace the JSON file") from None
    seen: set[int] = set()
    for im in doc["images"]:
        if int(im["id"]) in seen:
            raise DataError(f"{path} lists image id {int(im['id'])} twice; give every image its own id")
        seen.add(int(im["id"]))
    if len(set(names.values())) != len(names):
        raise DataError(f"{path} names one category twice; give every category its own name")
    return images, [names[k] for k in sorted(names)]


def _image_record(image: dict[str, Any], objects: list[dict[str, Any]], names: dict[int, str],
                  root: Path) -> CocoImage:
    boxes = [(x, y, x + w, y + h) for x, y, w, h in (map(float, a["bbox"]) for a in objects)]
    raw = RawAnnotation([names[int(a["category_id"])] for a in objects], np.asarray(boxes, np.float64).reshape(-1, 4),
                        np.asarray([bool(a.get("iscrowd", 0)) for a in objects], bool),
                        (int(image["height"]), int(image["width"])))
    name = str(image["file_name"])
    return CocoImage(str(PurePosixPath(name).with_suffix("")), root / name, raw)


@DET_DATASETS.register("coco")
class CocoDetection(DetectionSet):
    """Detection data in COCO format: ``annotations`` (default ``root/annotations/instances_<split>.json``)
    with images under ``image_root`` (default ``root/<split>``, the layout of the COCO release and of
    ``selftrain labels export --format coco``). ``class_names`` default to the categories in id order;
    categories outside them are skipped. Sizes come from the JSON, so boxes are read without decoding
    an image, and an image whose file has another size is a DataError."""

    def __init__(self, *, root: str, split: str = "train", annotations: str | None = None,
                 image_root: str | None = None, class_names: Sequence[str] | None = None, keep_difficult: bool = True,
                 list_file: str | None = None, with_labels: bool = True) -> None:
        if not root or not Path(root).is_dir():
            raise DataError(f"data path {root} does not exist; put the COCO-format data set there or fix its root")
        ann = Path(annotations) if annotations else Path(root) / "annotations" / f"instances_{split}.json"
        images_dir = Path(image_root) if image_root else Path(root) / split
        if not ann.is_file():
            raise DataError(f"COCO annotations {ann} do not exist; set options.annotations or the split")
        records, categories = read_coco_json(ann, images_dir)
        if not records:
            raise DataError(f"{ann} lists no images; check the annotation file")
        missing = [r.file for r in records if not r.file.is_file()]
        if missing:
            raise DataError(f"{len(missing)} images of {ann} are not under {images_dir} (first: {missing[0]}); "
                            "set options.image_root to the folder their file_name is relative to")
        self.records = [records[i] for i in select([r.id for r in records], list_file)]
        self.ids, self.class_names = [r.id for r in self.records], tuple(class_names or categories)
        self.known, self.keep_difficult, self.with_labels = categories, keep_difficult, with_labels
        self.where = str(ann)

    def image_path(self, index: int) -> Path:
        """The image file of ``index``."""
        return self.records[index].file

    def ground_truth(self, index: int) -> dict[str, torch.Tensor]:
        """{"boxes", "labels", "difficult"} of image ``index``, from the JSON alone."""
        record = self.records[index]
        return to_target(record.raw, class_names=self.class_names, known=self.known, size=record.raw.size,
                         keep_difficult=self.keep_difficult, where=f"{self.where} image {record.id}")

    def _image(self, index: int) -> np.ndarray:
        record = self.records[index]
        image = read_image(record.file, mode="RGB")
        if image.shape[:2] != record.raw.size:
            raise DataError(f"image {record.file} is {image.shape[1]}x{image.shape[0]} but {self.where} says "
                            f"{record.raw.size[1]}x{record.raw.size[0]}; fix the annotation or replace the image")
        return image
