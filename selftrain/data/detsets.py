"""Detection data sets behind their own registry. Every sample is a dict:

``image`` float32 [3, H, W] in [0, 1], not normalised (torchvision convention: the detector
normalises); ``boxes`` float32 [M, 4] xyxy in continuous pixel coordinates; ``labels`` int64 [M]
in 1..K (0 is background); ``difficult`` bool [M]; ``id`` str. An image without objects is kept
with M = 0 (boxes [0, 4]); with ``with_labels`` off M is always 0, and ``ground_truth(index)``
still reads the annotation (for reporting) without decoding the image.

Annotation rules of the file-based sets, in this order:
1. a class outside ``class_names`` is skipped when the data set knows it (a subset by design: VOC
   -> Watercolor keeps 6 of the 20 VOC classes, SIM10K drops motorbike and person, Cityscapes its
   stuff classes); a name a VOC-layout set does not know is a DataError naming class and file;
2. difficult objects are kept and flagged, or dropped with ``keep_difficult: false``;
3. boxes reaching outside the image are clipped to it, and 4. boxes of zero area (after
   clipping) are dropped, each with a log warning.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from . import synth_det
from .datasets import header_size, read_image
from .registry import DET_DATASETS

log = logging.getLogger(__name__)

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")
INOUE6_CLASSES = ("bicycle", "bird", "car", "cat", "dog", "person")  # Watercolor2k and Comic2k
CITYSCAPES_CLASSES = ("person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
FOGGY_BETAS = (0.005, 0.01, 0.02)


class RawAnnotation(NamedTuple):
    """Objects as a file lists them: names [M], boxes float64 [M, 4] continuous xyxy, difficult bool [M],
    and the image size (H, W) when the file states it."""

    names: list[str]
    boxes: np.ndarray
    difficult: np.ndarray
    size: tuple[int, int] | None


def _raw(names: list[str], boxes: list, difficult: list[bool], size: tuple[int, int] | None) -> RawAnnotation:
    return RawAnnotation(names, np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(difficult, bool), size)


# --------------------------------------------------------------------------- annotation files
def read_voc_xml(path: Path) -> RawAnnotation:
    """Pascal VOC XML. VOC pixel coordinates are 1-based and inclusive (xmin = 1 is the first
    column, xmax = W the last), so the continuous box is (xmin - 1, ymin - 1, xmax, ymax)."""
    try:
        root = ET.parse(path).getroot()
        width, height = (int(float(root.findtext(f"size/{k}") or 0)) for k in ("width", "height"))
        names, boxes, difficult = [], [], []
        for obj in root.findall("object"):
            xmin, ymin, xmax, ymax = (float(obj.find(f"bndbox/{k}").text) for k in ("xmin", "ymin", "xmax", "ymax"))
            names.append(obj.find("name").text.strip())
            boxes.append((xmin - 1, ymin - 1, xmax, ymax))
            difficult.append(int(obj.findtext("difficult") or 0) == 1)
    except (ET.ParseError, OSError, ValueError, TypeError, AttributeError) as exc:
        raise DataError(f"cannot parse annotation {path} ({exc.__class__.__name__}: {exc}); "
                        "fix or replace the XML file") from None
    return _raw(names, boxes, difficult, (height, width) if width > 0 and height > 0 else None)


def read_kitti_txt(path: Path, type_map: dict[str, str] | None = None) -> RawAnnotation:
    """KITTI object labels ``type truncated occluded alpha x1 y1 x2 y2 ...``; x1..y2 are taken as
    continuous coordinates as written (no +1). ``type_map`` renames types, unmapped ones become ""
    (skipped later). KITTI files state neither a difficult flag nor the image size."""
    names, boxes, number = [], [], 0
    try:
        for number, fields in enumerate((line.split() for line in path.read_text().splitlines()), 1):
            if fields:
                x1, y1, x2, y2 = map(float, fields[4:8])  # fewer than 4 values: ValueError
                names.append(fields[0] if type_map is None else type_map.get(fields[0], ""))
                boxes.append((x1, y1, x2, y2))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"cannot read {path} line {number} ({exc.__class__.__name__}); a KITTI label line is "
                        "'type truncated occluded alpha x1 y1 x2 y2 ...': fix or remove it") from None
    return _raw(names, boxes, [False] * len(names), None)


def read_cityscapes_json(path: Path) -> RawAnnotation:
    """Cityscapes ``*_gtFine_polygons.json`` (read with cityscapesscripts). Each box is the tightest
    rectangle around the polygon's vertices, (min x, min y, max x, max y), vertices taken as
    continuous coordinates; polygons are as annotated, so a box also covers parts that a later
    polygon hides. Deleted objects and group labels ("cargroup", ...) are skipped."""
    from cityscapesscripts.helpers.annotation import Annotation

    ann = Annotation()
    try:
        ann.fromJsonText(path.read_text())
        objects = [(o.label, [(p.x, p.y) for p in o.polygon]) for o in ann.objects
                   if hasattr(o, "polygon") and not o.deleted and not o.label.endswith("group")]
        boxes = [(*np.min(poly, axis=0), *np.max(poly, axis=0)) for _, poly in objects]  # empty: ValueError
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise DataError(f"cannot parse annotation {path} ({exc.__class__.__name__}: {exc}); "
                        "fix or replace the JSON file") from None
    return _raw([label for label, _ in objects], boxes, [False] * len(objects), (ann.imgHeight, ann.imgWidth))


# --------------------------------------------------------------------------- to tensors
def to_target(raw: RawAnnotation, *, class_names: Sequence[str], known: Sequence[str] | None,
              keep_difficult: bool, size: tuple[int, int], where: str) -> dict[str, torch.Tensor]:
    """{"boxes" [M, 4], "labels" [M], "difficult" [M]} by the rules of the module docstring; ``known``
    lists the classes the data set may contain (None: anything, and what is not wanted is skipped)."""
    index = {name: i + 1 for i, name in enumerate(class_names)}
    unknown = [n for n in raw.names if n not in index and known is not None and n not in known]
    if unknown:
        raise DataError(f"unknown class {unknown[0]!r} in {where}; fix the annotation or add the class to class_names")
    keep = np.array([n in index for n in raw.names], bool) & (keep_difficult | ~raw.difficult)
    labels = np.array([index[n] for n, k in zip(raw.names, keep) if k], np.int64)
    boxes, valid = clip_boxes(raw.boxes[keep], size, where)
    return {"boxes": torch.from_numpy(boxes[valid].astype(np.float32)).reshape(-1, 4),
            "labels": torch.from_numpy(labels[valid]), "difficult": torch.from_numpy(raw.difficult[keep][valid])}


def clip_boxes(boxes: np.ndarray, size: tuple[int, int], where: str) -> tuple[np.ndarray, np.ndarray]:
    """Clip [M, 4] xyxy to an image of ``size`` (H, W); returns the boxes and bool [M]: positive area."""
    clipped = boxes.clip(0, [size[1], size[0], size[1], size[0]])
    outside = int((clipped != boxes).any(1).sum())
    if outside:
        log.warning("%s: clipped %d box(es) reaching outside the %dx%d image", where, outside, size[1], size[0])
    valid = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    if not valid.all():
        log.warning("%s: dropped %d box(es) of zero area", where, int((~valid).sum()))
    return clipped, valid


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)


# --------------------------------------------------------------------------- data sets
class DetectionSet(Dataset):
    """Sample assembly shared by the detection sets: subclasses set ``ids``, ``class_names`` and
    ``with_labels`` and implement ``_image(index)`` (uint8 [H, W, 3]), ``ground_truth(index)`` and
    ``image_path(index)`` (the image file, None when the image is rendered in memory)."""

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = image_tensor(self._image(index))
        if self.with_labels:
            return {"image": image, **self.ground_truth(index), "id": self.ids[index]}
        return {"image": image, "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "difficult": torch.zeros(0, dtype=torch.bool), "id": self.ids[index]}


class DetItem(NamedTuple):
    id: str
    image: Path
    annotation: Path


class DetectionFiles(DetectionSet):
    """Image files with one annotation file each, read by ``reader(path) -> RawAnnotation``.
    ``list_file`` (one id per line) keeps those ids in its order; ``known``: see :func:`to_target`;
    ``where`` names the data set and folder in messages."""

    def __init__(self, *, items: list[DetItem], reader: Callable[[Path], RawAnnotation], class_names: Sequence[str],
                 known: Sequence[str] | None = None, keep_difficult: bool = True, list_file: str | None = None,
                 with_labels: bool = True, where: str = "") -> None:
        if not items:
            raise DataError(f"no images in {where}; check the root and the split")
        self.items = [items[i] for i in select([it.id for it in items], list_file)]
        missing = [it.annotation for it in self.items if with_labels and not it.annotation.is_file()]
        if missing:
            raise DataError(f"{len(missing)} images have no annotation (first: {missing[0]}); add them or "
                            "set with_labels: false")
        self.ids, self.class_names, self.known = [it.id for it in self.items], tuple(class_names), known
        self.reader, self.keep_difficult, self.with_labels = reader, keep_difficult, with_labels
        self._cache: dict[int, tuple[dict[str, torch.Tensor], tuple[int, int]]] = {}  # parsed once per index

    def image_path(self, index: int) -> Path:
        """The image file of ``index``."""
        return self.items[index].image

    def ground_truth(self, index: int) -> dict[str, torch.Tensor]:
        """{"boxes", "labels", "difficult"} of image ``index``, read without decoding the image."""
        return {k: v.clone() for k, v in self._annotation(index)[0].items()}

    def _annotation(self, index: int) -> tuple[dict[str, torch.Tensor], tuple[int, int]]:
        if index not in self._cache:
            item = self.items[index]
            if not item.annotation.is_file():
                raise DataError(f"annotation {item.annotation} does not exist; add it or evaluate without labels")
            raw = self.reader(item.annotation)
            size = raw.size or header_size(item.image)
            self._cache[index] = (to_target(raw, class_names=self.class_names, known=self.known, size=size,
                                            keep_difficult=self.keep_difficult, where=str(item.annotation)), size)
        return self._cache[index]

    def _image(self, index: int) -> np.ndarray:
        item, image = self.items[index], read_image(self.items[index].image, mode="RGB")
        if self.with_labels and image.shape[:2] != (size := self._annotation(index)[1]):
            raise DataError(f"image {item.image} is {image.shape[1]}x{image.shape[0]} but {item.annotation} says "
                            f"{size[1]}x{size[0]}; fix the annotation or replace the image")
        return image


def read_ids(path: Path, what: str = "list_file") -> list[str]:
    """Ids, one per line (the first token: VOC per-class lists carry a flag after it)."""
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist; fix the path")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def select(ids: list[str], list_file: str | None) -> list[int]:
    """Indices of the ids that ``list_file`` names, in its order (all when None); an unknown or
    repeated id is an error."""
    if list_file is None:
        return list(range(len(ids)))
    position, wanted = {image_id: i for i, image_id in enumerate(ids)}, read_ids(Path(list_file))
    missing = [i for i in wanted if i not in position]
    if missing:
        raise DataError(f"{len(missing)} ids in list_file {list_file} are not in the data set "
                        f"(first: {missing[0]!r}); fix the list or the split")
    if len(set(wanted)) != len(wanted):
        repeated = next(i for n, i in enumerate(wanted) if i in wanted[:n])
        raise DataError(f"list_file {list_file} names image {repeated!r} twice; list each image once")
    return [position[i] for i in wanted]


def images_by_stem(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist; fix the data set root")
    return {Path(e.name).stem: Path(e.path) for e in os.scandir(folder)
            if Path(e.name).suffix.lower() in (".jpg", ".jpeg", ".png")}


def voc_layout_items(base: Path, split: str | None, prefix: str = "") -> list[DetItem]:
    """``base/{JPEGImages, Annotations, ImageSets/Main/<split>.txt}``; split None: every image."""
    images, lists = images_by_stem(base / "JPEGImages"), base / "ImageSets" / "Main"
    if split is not None and not (lists / f"{split}.txt").is_file():
        valid = sorted(p.stem for p in lists.glob("*.txt") if p.stem.split("_")[0] not in VOC_CLASSES)
        raise DataError(f"split list {lists / f'{split}.txt'} does not exist; choose one of: {', '.join(valid) or '(none)'}")
    ids = sorted(images) if split is None else read_ids(lists / f"{split}.txt", "split list")
    if len(set(ids)) != len(ids):
        repeated = next(i for n, i in enumerate(ids) if i in ids[:n])
        raise DataError(f"split list {lists / f'{split}.txt'} names image {repeated!r} twice; list each image once")
    missing = [i for i in ids if i not in images]
    if missing:
        raise DataError(f"{len(missing)} images of split {split} are missing from {base / 'JPEGImages'} "
                        f"(first: {missing[0]}); restore them or fix the split list")
    return [DetItem(prefix + i, images[i], base / "Annotations" / f"{i}.xml") for i in ids]


def _root(root: str | None, name: str) -> Path:
    if not root:
        raise DataError(f"the {name} data set needs a root; set data.<source|target>.root in the recipe")
    if not Path(root).is_dir():
        raise DataError(f"data path {root} does not exist; put the {name} data set there or fix its root in the recipe")
    return Path(root)


# --------------------------------------------------------------------------- registered sets
@DET_DATASETS.register("voc")
def voc(*, root: str, split: str = "trainval", year: int = 2007, years: Sequence[int] | None = None,
        class_names: Sequence[str] | None = None, keep_difficult: bool = True, list_file: str | None = None,
        with_labels: bool = True) -> DetectionFiles:
    """Pascal VOC 2007/2012: ``root`` is VOCdevkit (holding VOC<year>/) or one VOC<year> folder;
    ``split`` names ImageSets/Main/<split>.txt; ``years: [2007, 2012]`` joins years ("07+12") with
    ids like "VOC2007/000005"."""
    base, years = _root(root, "voc"), list(years or [year])
    folders = [(base, "")] if len(years) == 1 and (base / "JPEGImages").is_dir() else []
    for y in years if not folders else ():
        if y not in (2007, 2012) or not (base / f"VOC{y}").is_dir():
            raise DataError(f"no VOC{y} folder in {base}; years are 2007 or 2012, and root must be VOCdevkit")
        folders.append((base / f"VOC{y}", f"VOC{y}/" if len(years) > 1 else ""))
    return DetectionFiles(items=[it for folder, prefix in folders for it in voc_layout_items(folder, split, prefix)],
                          reader=read_voc_xml, where=f"voc {base} split {split}", known=VOC_CLASSES,
                          class_names=class_names or VOC_CLASSES, keep_difficult=keep_difficult, list_file=list_file,
                          with_labels=with_labels)


def _voc_like(name: str, classes: tuple[str, ...], known: tuple[str, ...] | None, split: str,
              doc: str) -> Callable[..., DetectionFiles]:
    """A constructor for a VOC layout directly under root (JPEGImages, Annotations,
    ImageSets/Main/<split>.txt; every image when ImageSets/Main holds no lists)."""
    def make(*, root: str, split: str = split, class_names: Sequence[str] | None = None, keep_difficult: bool = True,
             list_file: str | None = None, with_labels: bool = True) -> DetectionFiles:
        base = _root(root, name)
        lists = base / "ImageSets" / "Main"
        items = voc_layout_items(base, split if lists.is_dir() and any(lists.glob("*.txt")) else None)
        return DetectionFiles(items=items, reader=read_voc_xml, where=f"{name} {base} split {split}",
                              class_names=class_names or classes, known=known, keep_difficult=keep_difficult,
                              list_file=list_file, with_labels=with_labels)

    make.__name__, make.__doc__ = name, doc
    return make


_INOUE = "(Inoue et al., CVPR 2018, arXiv:1803.11365): VOC layout under root, splits train and test; classes:"
for _name, _classes, _known, _split, _doc in (
        ("clipart", VOC_CLASSES, VOC_CLASSES, "train", f"Clipart1k {_INOUE} the 20 of VOC."),
        ("watercolor", INOUE6_CLASSES, INOUE6_CLASSES, "train", f"Watercolor2k {_INOUE} {', '.join(INOUE6_CLASSES)}."),
        ("comic", INOUE6_CLASSES, INOUE6_CLASSES, "train", f"Comic2k {_INOUE} {', '.join(INOUE6_CLASSES)}."),
        ("sim10k", ("car",), None, "trainval", ("SIM10K (Johnson-Roberson et al., ICRA 2017, arXiv:1610.01983): "
         "VOC layout under root; only car by default (its motorbike and person objects are skipped)."))):
    DET_DATASETS.register(_name)(_voc_like(_name, _classes, _known, _split, _doc))

_KITTI_FOLDERS = {"training": "training", "train": "training", "testing": "testing", "test": "testing"}


@DET_DATASETS.register("kitti")
def kitti(*, root: str, split: str = "training", type_map: dict[str, str] | None = None,
          class_names: Sequence[str] | None = None, list_file: str | None = None,
          with_labels: bool = True) -> DetectionFiles:
    """KITTI object detection: root/<training|testing>/{image_2/*.png, label_2/*.txt}. ``type_map``
    renames KITTI types to classes; the default {"Car": "car"} keeps cars only, as the KITTI ->
    Cityscapes literature does (add "Van": "car" to merge vans). DontCare and unmapped types are skipped."""
    if split not in _KITTI_FOLDERS:
        raise DataError(f"kitti split {split!r} is unknown; choose one of: {', '.join(_KITTI_FOLDERS)}")
    base, type_map = _root(root, "kitti") / _KITTI_FOLDERS[split], dict(type_map or {"Car": "car"})
    items = [DetItem(stem, path, base / "label_2" / f"{stem}.txt")
             for stem, path in sorted(images_by_stem(base / "image_2").items())]
    return DetectionFiles(items=items, reader=functools.partial(read_kitti_txt, type_map=type_map),
                          where=f"kitti {base}", class_names=class_names or tuple(sorted(set(type_map.values()))),
                          list_file=list_file, with_labels=with_labels)


def _cityscapes(name: str, root: str, split: str, folder: str, suffix: str, **kwargs: Any) -> DetectionFiles:
    base = _root(root, name)
    if not (base / folder / split).is_dir():
        raise DataError(f"{base / folder / split} does not exist; check the root and the split (train, val, test)")
    items = [DetItem(p.name[:-len(suffix)], p, base / "gtFine" / split / p.parent.name /
                     f"{p.name[:-len(suffix)]}_gtFine_polygons.json")
             for p in sorted((base / folder / split).glob(f"*/*{suffix}"))]
    return DetectionFiles(items=items, reader=read_cityscapes_json, where=f"{name} {base / folder / split}", **kwargs)


@DET_DATASETS.register("cityscapes_boxes")
def cityscapes_boxes(*, root: str, split: str = "train", class_names: Sequence[str] | None = None,
                     list_file: str | None = None, with_labels: bool = True) -> DetectionFiles:
    """Cityscapes (Cordts et al., CVPR 2016) with boxes from gtFine instance polygons (see
    :func:`read_cityscapes_json`); the 8 instance classes by default."""
    return _cityscapes("cityscapes_boxes", root, split, "leftImg8bit", "_leftImg8bit.png",
                       class_names=class_names or CITYSCAPES_CLASSES, list_file=list_file, with_labels=with_labels)


@DET_DATASETS.register("foggy_cityscapes_boxes")
def foggy_cityscapes_boxes(*, root: str, split: str = "train", beta: float = 0.02,
                           class_names: Sequence[str] | None = None, list_file: str | None = None,
                           with_labels: bool = True) -> DetectionFiles:
    """Foggy Cityscapes (Sakaridis et al., IJCV 2018, arXiv:1708.07819): leftImg8bit_foggy images of
    fog density ``beta`` with the Cityscapes gtFine boxes."""
    if beta not in FOGGY_BETAS:
        raise DataError(f"foggy beta {beta!r} is not released; choose one of: {', '.join(map(str, FOGGY_BETAS))}")
    return _cityscapes("foggy_cityscapes_boxes", root, split, "leftImg8bit_foggy", f"_leftImg8bit_foggy_beta_{beta}.png",
                       class_names=class_names or CITYSCAPES_CLASSES, list_file=list_file, with_labels=with_labels)


@DET_DATASETS.register("synth_shapes")
class SynthShapes(DetectionSet):
    """The embedded detection benchmark rendered on the fly (:mod:`selftrain.data.synth_det`).

    ``split``: source, target_train or target_val (ids "<split>_<index:05d>"); ``num_images``,
    ``seed``, ``height``, ``width``: the benchmark's size and random stream; ``cache``: keep rendered
    images in memory (about 48 KB per 128x128 image) for repeated epochs.
    """

    name = "synth_shapes"

    def __init__(self, *, split: str, num_images: int = 600, seed: int = 0, height: int = 128, width: int = 128,
                 class_names: Sequence[str] | None = None, list_file: str | None = None, with_labels: bool = True,
                 root: str | None = None, cache: bool = True) -> None:
        if split not in synth_det.SPLITS:
            raise DataError(f"{self.name} split {split!r} is unknown; choose one of: {', '.join(synth_det.SPLITS)}")
        if root is not None:
            raise DataError(f"{self.name} is generated in memory and takes no root; read a benchmark written by "
                            "write_det_benchmark with the voc data set")
        if class_names is not None and tuple(class_names) != synth_det.CLASS_NAMES:
            raise DataError(f"{self.name} has the classes {', '.join(synth_det.CLASS_NAMES)} in this order; "
                            "set class_names to exactly these or leave them out")
        self.split, self.seed, self.size, self.with_labels, self.cache = split, seed, (height, width), with_labels, cache
        self.class_names, all_ids = synth_det.CLASS_NAMES, [f"{split}_{i:05d}" for i in range(num_images)]
        self.indices = select(all_ids, list_file)
        self.ids = [all_ids[i] for i in self.indices]
        self._cache: dict[int, synth_det.DetImage] = {}

    def _render(self, index: int) -> synth_det.DetImage:
        if index in self._cache:
            return self._cache[index]
        out = self._draw(self.indices[index])
        if self.cache:
            self._cache[index] = out
        return out

    def _draw(self, index: int) -> synth_det.DetImage:
        return synth_det.render(self.split, index, seed=self.seed, height=self.size[0], width=self.size[1])

    def _image(self, index: int) -> np.ndarray:
        return self._render(index).image

    def image_path(self, index: int) -> None:
        """None: the images are rendered in memory, there is no file to copy or link."""
        return None

    def ground_truth(self, index: int) -> dict[str, torch.Tensor]:
        """{"boxes", "labels", "difficult"} of image ``index`` even when ``with_labels`` is off."""
        r = self._render(index)
        return {"boxes": torch.from_numpy(r.boxes.copy()), "labels": torch.from_numpy(r.labels.copy()),
                "difficult": torch.zeros(len(r.labels), dtype=torch.bool)}


@DET_DATASETS.register("synth_shapes_fog")
class SynthShapesFog(SynthShapes):
    """``synth_shapes`` photo-like in both domains, the target splits in fog
    (:func:`selftrain.data.synth_det.render_fog`): a Cityscapes -> Foggy Cityscapes analogue.

    ``beta``: fog density in 1/m (default 0.02, the Foggy Cityscapes val set the papers report; 0
    is the clear image); ``same_scenes``: target_train shows the source scenes in fog, as Foggy
    Cityscapes train shows Cityscapes train. Other options as ``synth_shapes``.
    """

    name = "synth_shapes_fog"

    def __init__(self, *, split: str, beta: float = synth_det.FOG_BETA, same_scenes: bool = False,
                 num_images: int = 600, seed: int = 0, height: int = 128, width: int = 128,
                 class_names: Sequence[str] | None = None, list_file: str | None = None, with_labels: bool = True,
                 root: str | None = None, cache: bool = True) -> None:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0:
            raise DataError(f"synth_shapes_fog beta must be a number >= 0 (1/m; Foggy Cityscapes: "
                            f"{', '.join(map(str, FOGGY_BETAS))}), got {beta!r}")
        if not isinstance(same_scenes, bool):
            raise DataError(f"synth_shapes_fog same_scenes must be true or false, got {same_scenes!r}")
        super().__init__(split=split, num_images=num_images, seed=seed, height=height, width=width,
                         class_names=class_names, list_file=list_file, with_labels=with_labels, root=root, cache=cache)
        self.beta, self.same_scenes = float(beta), same_scenes

    def _draw(self, index: int) -> synth_det.DetImage:
        return synth_det.render_fog(self.split, index, seed=self.seed, height=self.size[0], width=self.size[1],
                                    beta=self.beta, same_scenes=self.same_scenes)


def build_det_dataset(name: str, *, root: str | None, split: str, options: dict[str, Any],
                      class_names: Sequence[str] | None = None, with_labels: bool = True) -> Dataset:
    """Construct a registered detection data set; unknown options name the valid ones. ``class_names``
    (the recipe's) replace the data set's default unless ``options`` set them."""
    if root is not None and not Path(root).exists():
        raise DataError(f"data path {root} does not exist; put the {name} data set there or fix its root in the recipe")
    ctor = DET_DATASETS.get(name)
    params = inspect.signature(ctor).parameters
    kwargs: dict[str, Any] = {"root": root, "split": split, **options}
    if class_names is not None and "class_names" not in options:
        kwargs["class_names"] = list(class_names)
    kwargs.setdefault("with_labels", with_labels)
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        valid = sorted(set(params) - {"root", "split"})
        raise DataError(f"detection data set {name} has no option {unknown[0]!r}; valid options: {', '.join(valid)}")
    return ctor(**kwargs)

