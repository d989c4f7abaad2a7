"""Writers of tiny detection data sets in each real on-disk layout, for loader and end-to-end tests.

Each writer returns what it wrote, ``{image id: [Obj, ...]}``, with boxes in the loaders' convention
(continuous xyxy pixels) before any class filtering, clipping or dropping. The default contents
include a difficult object (VOC layouts), classes the default class list skips, and an image
without objects. Import as ``from det_layouts import write_voc`` (tests/ is on sys.path).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = (24, 32)  # (H, W) of the VOC-layout images
KITTI_SIZE = (30, 60)
CITYSCAPES_SIZE = (32, 64)


@dataclass(frozen=True)
class Obj:
    """One written object: box in continuous xyxy pixels (VOC files get xmin + 1, ymin + 1)."""

    name: str
    box: tuple[float, float, float, float]
    difficult: bool = False
    deleted: bool = False  # Cityscapes polygons only
    polygon: tuple[tuple[float, float], ...] = ()  # Cityscapes only; box is its tightest rectangle


VOC_IMAGES = {
    "000001": [Obj("person", (2, 3, 12, 20)), Obj("car", (14, 4, 30, 16), difficult=True)],
    "000002": [],
    "000003": [Obj("dog", (0, 0, 32, 24)), Obj("bicycle", (5.5, 6, 9, 20)), Obj("cow", (20, 10, 28, 22))],
}
INOUE_IMAGES = {  # only classes of the 6-class sets, so clipart, watercolor and comic can share it
    "c001": [Obj("person", (1, 1, 10, 22)), Obj("dog", (12, 8, 31, 23), difficult=True)],
    "c002": [],
    "c003": [Obj("bicycle", (3, 2, 29, 20)), Obj("car", (0, 12, 8, 24))],
}
SIM10K_IMAGES = {
    "3384645": [Obj("car", (1, 2, 20, 14)), Obj("motorbike", (21, 5, 30, 15)), Obj("person", (22, 1, 26, 12))],
    "3384646": [Obj("person", (4, 4, 8, 20))],
    "3384647": [Obj("car", (10, 10, 31, 23)), Obj("car", (0, 0, 6, 5))],
}
KITTI_IMAGES = {
    "000000": [Obj("Car", (10.5, 5.25, 30.0, 20.75)), Obj("Van", (32, 4, 50, 22)), Obj("Pedestrian", (52, 2, 58, 28)),
               Obj("DontCare", (0, 0, 8, 8))],
    "000001": [Obj("DontCare", (1, 1, 20, 10))],
    "000002": [],
}


def _polygon_obj(name: str, points: list[tuple[float, float]], deleted: bool = False) -> Obj:
    xs, ys = zip(*points)
    return Obj(name, (min(xs), min(ys), max(xs), max(ys)), deleted=deleted, polygon=tuple(points))


CITYSCAPES_IMAGES = {
    "aachen_000000_000019": [
        _polygon_obj("road", [(0, 20), (63, 20), (63, 31), (0, 31)]),
        _polygon_obj("car", [(10, 12), (25, 10), (30, 18), (12, 22)]),
        _polygon_obj("person", [(40, 5), (44, 4), (45, 25), (39, 26)]),
        _polygon_obj("cargroup", [(50, 10), (60, 10), (60, 20)]),
        _polygon_obj("bicycle", [(30, 20), (38, 21), (36, 28)], deleted=True),
        _polygon_obj("rider", [(2, 2), (6, 3), (5, 9)]),
    ],
    "aachen_000001_000019": [_polygon_obj("sky", [(0, 0), (63, 0), (63, 10), (0, 10)])],
    "bochum_000000_000313": [_polygon_obj("truck", [(5, 5), (30, 5), (30, 25), (5, 25)]),
                             _polygon_obj("bus", [(33, 2), (62, 3), (61, 30)])],
}


def write_image(path: Path, size: tuple[int, int], seed: int = 0) -> None:
    """Random RGB pixels of ``size`` (H, W); the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def voc_xml_text(filename: str, size: tuple[int, int], objects: list[Obj]) -> str:
    """VOC XML written by hand (1-based inclusive pixel coordinates: xmin = x0 + 1, xmax = x1)."""
    parts = [f"<annotation><folder>VOC</folder><filename>{filename}</filename>",
             f"<size><width>{size[1]}</width><height>{size[0]}</height><depth>3</depth></size>"]
    for o in objects:
        x0, y0, x1, y1 = o.box
        parts.append(f"<object><name>{o.name}</name><pose>Unspecified</pose><truncated>0</truncated>"
                     f"<difficult>{int(o.difficult)}</difficult><bndbox><xmin>{_num(x0 + 1)}</xmin>"
                     f"<ymin>{_num(y0 + 1)}</ymin><xmax>{_num(x1)}</xmax><ymax>{_num(y1)}</ymax></bndbox></object>")
    return "\n".join(parts) + "\n</annotation>\n"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def write_voc_layout(base: Path, images: dict[str, list[Obj]], *, split: str | None, size: tuple[int, int] = SIZE,
                     suffix: str = ".jpg") -> dict[str, list[Obj]]:
    """``base/{JPEGImages, Annotations, ImageSets/Main/<split>.txt}``; split None writes no list."""
    for seed, (image_id, objects) in enumerate(images.items()):
        write_image(base / "JPEGImages" / f"{image_id}{suffix}", size, seed)
        (base / "Annotations").mkdir(parents=True, exist_ok=True)
        (base / "Annotations" / f"{image_id}.xml").write_text(voc_xml_text(image_id + suffix, size, objects))
    if split is not None:
        lists = base / "ImageSets" / "Main"
        lists.mkdir(parents=True, exist_ok=True)
        (lists / f"{split}.txt").write_text("".join(f"{i}\n" for i in images))
    return dict(images)


def write_voc(root: Path, *, year: int = 2007, split: str = "trainval", images: dict[str, list[Obj]] | None = None,
              size: tuple[int, int] = SIZE) -> dict[str, list[Obj]]:
    """Pascal VOC: ``root`` is VOCdevkit; writes root/VOC<year>/... (a difficult car, an empty image, a cow)."""
    return write_voc_layout(Path(root) / f"VOC{year}", VOC_IMAGES if images is None else images, split=split, size=size)


def write_clipart(root: Path, *, split: str = "train", images: dict[str, list[Obj]] | None = None,
                  size: tuple[int, int] = SIZE) -> dict[str, list[Obj]]:
    """Clipart1k / Watercolor2k / Comic2k: VOC layout directly under ``root``; default objects use
    only the 6 shared classes, so the same files serve all three data sets."""
    return write_voc_layout(Path(root), INOUE_IMAGES if images is None else images, split=split, size=size)


def write_sim10k(root: Path, *, split: str | None = "trainval", images: dict[str, list[Obj]] | None = None,
                 size: tuple[int, int] = SIZE) -> dict[str, list[Obj]]:
    """SIM10K: VOC layout under ``root`` with car, motorbike and person objects; split None: no lists."""
    return write_voc_layout(Path(root), SIM10K_IMAGES if images is None else images, split=split, size=size)


def write_kitti(root: Path, *, images: dict[str, list[Obj]] | None = None,
                size: tuple[int, int] = KITTI_SIZE) -> dict[str, list[Obj]]:
    """KITTI object: root/training/{image_2/<id>.png, label_2/<id>.txt}; one image with only DontCare
    and one with an empty label file."""
    images = KITTI_IMAGES if images is None else images
    base = Path(root) / "training"
    (base / "label_2").mkdir(parents=True, exist_ok=True)
    for seed, (image_id, objects) in enumerate(images.items()):
        write_image(base / "image_2" / f"{image_id}.png", size, seed)
        lines = [f"{o.name} 0.00 0 -1.57 {o.box[0]:.2f} {o.box[1]:.2f} {o.box[2]:.2f} {o.box[3]:.2f} "
                 "1.73 0.82 1.78 1.84 1.47 8.41 1.01" for o in objects]
        (base / "label_2" / f"{image_id}.txt").write_text("".join(line + "\n" for line in lines))
    return dict(images)


def write_cityscapes_boxes(root: Path, *, foggy: bool = True, split: str = "train", betas: tuple[float, ...] = (0.02,),
                           images: dict[str, list[Obj]] | None = None,
                           size: tuple[int, int] = CITYSCAPES_SIZE) -> dict[str, list[Obj]]:
    """Cityscapes: leftImg8bit/<split>/<city>/<id>_leftImg8bit.png, gtFine/<split>/<city>/<id>_gtFine_polygons.json
    and, with ``foggy``, leftImg8bit_foggy/<split>/<city>/<id>_leftImg8bit_foggy_beta_<beta>.png.
    Default polygons include stuff (road, sky), a group, a deleted object and an image without instances."""
    images = CITYSCAPES_IMAGES if images is None else images
    root = Path(root)
    for seed, (image_id, objects) in enumerate(images.items()):
        city = image_id.split("_")[0]
        write_image(root / "leftImg8bit" / split / city / f"{image_id}_leftImg8bit.png", size, seed)
        for beta in betas if foggy else ():
            write_image(root / "leftImg8bit_foggy" / split / city / f"{image_id}_leftImg8bit_foggy_beta_{beta}.png",
                        size, seed + 100)
        gt = root / "gtFine" / split / city / f"{image_id}_gtFine_polygons.json"
        gt.parent.mkdir(parents=True, exist_ok=True)
        gt.write_text(json.dumps({"imgHeight": size[0], "imgWidth": size[1], "objects": [
            {"label": o.name, "polygon": [list(p) for p in o.polygon], **({"deleted": 1} if o.deleted else {})}
            for o in objects]}))
    return dict(images)


COCO_IMAGES = {  # file name under the image root -> objects; "person" crowds are flagged difficult
    "a/frame_01.jpg": [Obj("car", (2, 3, 14.5, 20)), Obj("person", (16, 2, 30, 22), difficult=True)],
    "a/frame_02.jpg": [],
    "b/frame_03.jpg": [Obj("bicycle", (0, 0, 32, 24)), Obj("car", (5, 6, 9, 20))],
}


def write_coco(root: Path, *, split: str = "val", images: dict[str, list[Obj]] | None = None,
               size: tuple[int, int] = SIZE) -> dict[str, list[Obj]]:
    """COCO format: root/annotations/instances_<split>.json (bbox [x, y, w, h], iscrowd for difficult,
    category ids that do not follow the names' order) with images under root/<split>/."""
    images = COCO_IMAGES if images is None else images
    names = sorted({o.name for objects in images.values() for o in objects}, reverse=True)
    categories = [{"id": 10 * (i + 1), "name": name} for i, name in enumerate(names)]
    ids = {c["name"]: c["id"] for c in categories}
    records, annotations = [], []
    for seed, (file_name, objects) in enumerate(images.items(), start=1):
        write_image(Path(root) / split / file_name, size, seed)
        records.append({"id": seed, "file_name": file_name, "height": size[0], "width": size[1]})
        for o in objects:
            x0, y0, x1, y1 = o.box
            annotations.append({"id": len(annotations) + 1, "image_id": seed, "category_id": ids[o.name],
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": int(o.difficult)})
    path = Path(root) / "annotations" / f"instances_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": records, "annotations": annotations, "categories": categories}))
    return {str(Path(name).with_suffix("")): objects for name, objects in images.items()}
