"""``selftrain labels export``: one round's pseudo-labels in the formats other tools read.

- ``png``: ``<out>/<id>.png``, uint8 class indices, the run's ``ignore_index`` where not selected.
- ``cityscapes``: ``<out>/<id>_pseudo_labelIds.png`` in Cityscapes label ids (cityscapesscripts'
  table, matched by class name; unselected pixels are 0 = ``unlabeled``), the format the
  Cityscapes evaluation and visualisation scripts read.
- ``voc``: ``<out>/Annotations/<id>.xml`` (1-based inclusive pixel coordinates, as the VOC devkit)
  with a ``<score>`` per object, and ``<out>/ImageSets/Main/pseudo.txt``.
- ``coco``: ``<out>/pseudo_round_RRR.json`` (boxes as ``[x, y, width, height]``, ``score`` per box).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .errors import UserError
from .inspect import open_round_of, open_run
from .io import atomic_path, write_text_atomic
from .overlay import cityscapes_label
from .progress import progress
from .store import RoundReader

FORMATS = {"segmentation": ("png", "cityscapes"), "detection": ("voc", "coco")}


def export_round(path: str | Path, round_index: int, out_dir: str | Path, fmt: str) -> int:
    """Write round ``round_index`` of a run in format ``fmt``; returns the number of images written."""
    run = open_run(path)
    out = Path(out_dir)
    with open_round_of(run, round_index) as reader:
        valid = FORMATS[reader.task]
        if fmt not in valid:
            raise UserError(f"--format {fmt} does not fit {reader.task} pseudo-labels; use one of: {', '.join(valid)}")
        if fmt in ("png", "cityscapes"):
            return _export_masks(reader, out, cityscapes=fmt == "cityscapes")
        from .views import target_dataset

        dataset, class_names = target_dataset(run)
        sizes = [tuple(dataset[i]["image"].shape[-2:]) for i in progress(range(len(reader)), desc="image sizes")]
        if fmt == "voc":
            return _export_voc(reader, out, class_names, sizes)
        return _export_coco(reader, out, class_names, sizes)


def cityscapes_lookup(class_names: Sequence[str], ignore_index: int) -> np.ndarray:
    """A 256-entry table from class index to Cityscapes label id; ignored -> 0 (unlabeled)."""
    table = np.zeros(256, dtype=np.uint8)
    for c, name in enumerate(class_names):
        label = cityscapes_label(name)
        if label is None or label.id < 0:
            raise UserError(f"class {name!r} is not a Cityscapes class, so --format cityscapes cannot name it; "
                            "use --format png")
        table[c] = label.id
    table[ignore_index] = 0
    return table


def _export_masks(reader: RoundReader, out: Path, *, cityscapes: bool) -> int:
    ignore = int(reader.meta["ignore_index"])
    table = cityscapes_lookup(reader.meta["class_names"], ignore) if cityscapes else None
    suffix = "_pseudo_labelIds.png" if cityscapes else ".png"
    for i in progress(range(len(reader)), desc="export", unit="img"):
        labels = reader.labels(i)
        _write_png(out / f"{reader.image_ids[i]}{suffix}", table[labels] if table is not None else labels)
    return len(reader)


def _write_png(path: Path, array: np.ndarray) -> None:
    with atomic_path(path, suffix=".png.tmp") as tmp:
        Image.fromarray(np.ascontiguousarray(array.astype(np.uint8))).save(tmp, format="PNG")


def _export_voc(reader: RoundReader, out: Path, class_names: Sequence[str], sizes) -> int:
    for i, image_id in enumerate(progress(reader.image_ids, desc="export", unit="img")):
        xml = voc_xml(image_id, sizes[i], reader.boxes(i), class_names)
        write_text_atomic(out / "Annotations" / f"{image_id}.xml", xml)
    write_text_atomic(out / "ImageSets" / "Main" / "pseudo.txt", "\n".join(reader.image_ids) + "\n")
    return len(reader)


def voc_xml(image_id: str, size: tuple[int, int], found: dict[str, np.ndarray], class_names: Sequence[str]) -> str:
    """A VOC annotation: continuous xyxy becomes 1-based inclusive integers (xmin + 1, ..., xmax)."""
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    size_el = ET.SubElement(root, "size")
    for tag, value in (("width", size[1]), ("height", size[0]), ("depth", 3)):
        ET.SubElement(size_el, tag).text = str(value)
    for box, label, score in zip(found["boxes"], found["labels"], found["scores"]):
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = class_names[int(label) - 1]
        ET.SubElement(obj, "difficult").text = "0"
        ET.SubElement(obj, "score").text = f"{float(score):.4f}"
        bnd = ET.SubElement(obj, "bndbox")
        x0, y0, x1, y1 = (float(v) for v in box)
        for tag, value in (("xmin", round(x0) + 1), ("ymin", round(y0) + 1), ("xmax", round(x1)), ("ymax", round(y1))):
            ET.SubElement(bnd, tag).text = str(int(value))
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def _export_coco(reader: RoundReader, out: Path, class_names: Sequence[str], sizes) -> int:
    images, annotations = [], []
    for i, image_id in enumerate(reader.image_ids):
        images.append({"id": i + 1, "file_name": image_id, "height": int(sizes[i][0]), "width": int(sizes[i][1])})
        annotations += coco_annotations(reader.boxes(i), image=i + 1, first_id=len(annotations) + 1)
    doc: dict[str, Any] = {
        "info": {"description": f"selftrain pseudo-labels, round {reader.meta['round']} ({reader.meta.get('policy')})"},
        "images": images, "annotations": annotations,
        "categories": [{"id": k + 1, "name": name} for k, name in enumerate(class_names)],
    }
    write_text_atomic(out / f"pseudo_round_{int(reader.meta['round']):03d}.json", json.dumps(doc))
    return len(reader)


def coco_annotations(found: dict[str, np.ndarray], *, image: int, first_id: int) -> list[dict[str, Any]]:
    """COCO records for one image's boxes (``bbox`` = [x, y, w, h]; ``srrs`` when the policy set it)."""
    out = []
    for k, (box, label, score, srrs) in enumerate(zip(found["boxes"], found["labels"], found["scores"], found["srrs"])):
        x0, y0, x1, y1 = (float(v) for v in box)
        record = {"id": first_id + k, "image_id": image, "category_id": int(label), "bbox": [x0, y0, x1 - x0, y1 - y0],
                  "area": (x1 - x0) * (y1 - y0), "iscrowd": 0, "score": float(score)}
        if np.isfinite(srrs):
            record["srrs"] = float(srrs)
        out.append(record)
    return out
