"""``selftrain labels export``: one round's pseudo-labels in the layouts that other tools read.

Each format writes the layout its readers expect, with the images beside the labels
(``--images link``: symbolic links to the data set's files, the default; ``copy``; ``none``).
Images that the run rendered in memory (``synth_street``, ``synth_shapes``) are written as files
for ``link`` and ``copy`` alike: PNG, or JPEG (quality 95) in the VOC layout, whose readers open
``<id>.jpg``. ``--split`` (default ``train``) names the split in the layout.

- ``png``: ``labels/<id>.png`` (uint8 class indices, the run's ``ignore_index`` where not
  selected) and ``images/<id>.<ext>``: the ``folder`` data set's layout.
- ``cityscapes``: ``gtFine/<split>/<city>/<stem>_gtFine_labelIds.png`` in Cityscapes label ids
  (cityscapesscripts' table, matched by class name; unselected pixels are 0 = ``unlabeled``) and
  ``leftImg8bit/<split>/<city>/<stem>_leftImg8bit.<ext>``, the layout of the ``cityscapes`` data set
  and of cityscapesscripts, whose evaluator finds a ``<city>_<seq>_<frame>*.png`` by that pattern.
  Ids without a city folder are put under one named after the run's target data set.
- ``voc``: ``Annotations/<id>.xml`` with every element the VOC devkit writes (boxes in its 1-based
  integer pixels, see :func:`voc_pixels`) plus ``<score>`` per object, ``ImageSets/Main/<split>.txt``
  and ``JPEGImages/``.
- ``coco``: ``annotations/instances_<split>.json`` (``info``, ``licenses``, ``images``,
  ``annotations`` with ``bbox`` = [x, y, w, h] as stored, floats, and ``score``; category ids
  1..K in the class order of the run) and the images under ``<split>/``. ``file_name`` is the
  image's path relative to the data set's root (a rendered image: ``<id>.png``), so it resolves
  against ``<out>/<split>`` and, for real data, against the data set's root; ``info.image_root``
  records the first (the second with ``--images none``).

In flat layouts (png, voc) a ``/`` in an id becomes ``_``. The export is built in a hidden folder
beside ``--out`` and renamed onto it when complete, so a failed export leaves ``--out`` as it was.
``--out`` must be new or empty, or hold an earlier export (``selftrain_export.json``), which only
``--overwrite`` replaces: a folder holding anything else is never written into.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import re
import shutil
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from . import __version__
from .errors import DataError, UserError
from .inspect import open_round_of, open_run, run_recipe
from .io import atomic_path, write_text_atomic
from .overlay import cityscapes_label
from .progress import progress
from .store import RoundReader

log = logging.getLogger(__name__)

FORMATS = {"segmentation": ("png", "cityscapes"), "detection": ("voc", "coco")}
IMAGE_MODES = ("link", "copy", "none")
MANIFEST = "selftrain_export.json"
EXPORT_FORMAT = "selftrain.export/1"
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def export_round(path: str | Path, round_index: int, out_dir: str | Path, fmt: str, *, images: str = "link",
                 split: str = "train", overwrite: bool = False) -> int:
    """Write round ``round_index`` of a run in format ``fmt`` (``FORMATS``) to ``out_dir`` with the images
    placed by ``images`` (``IMAGE_MODES``) and the layout's split named ``split``; returns the number of
    images written. See the module docstring for the layouts and the rules about ``out_dir``."""
    check_options(fmt, images, split)
    run, out = open_run(path), Path(out_dir)
    with open_round_of(run, round_index) as reader:
        if fmt not in FORMATS[reader.task]:
            raise UserError(f"--format {fmt} does not fit {reader.task} pseudo-labels; use one of: "
                            f"{', '.join(FORMATS[reader.task])}")
        check_destination(out, overwrite=overwrite)
        cfg = run_recipe(run)
        needs_images = reader.task == "detection" or images != "none"
        target = TargetImages.of_recipe(cfg, reader) if needs_images else None
        try:
            with staged_folder(out) as staging:
                ex = Export(reader, staging, out.absolute(), split, images, target, cfg.data.target.name,
                            str(cfg.name), run.root.absolute())
                count = WRITERS[fmt](ex)
                write_manifest(ex, fmt, count)
        except OSError as exc:
            raise UserError(f"writing the export failed ({_why(exc)}); {out} is left as it was") from None
    log.info("wrote %d images of round %d as %s to %s", count, round_index, fmt, out)
    return count


def check_options(fmt: str, images: str, split: str) -> None:
    """One line naming the valid values for an unknown format, image mode or split name."""
    if not any(fmt in names for names in FORMATS.values()):
        raise UserError(f"--format {fmt!r} is unknown; use png or cityscapes (segmentation), voc or coco (detection)")
    if images not in IMAGE_MODES:
        raise UserError(f"--images {images!r} is unknown; use one of: {', '.join(IMAGE_MODES)}")
    if not _PLAIN_NAME.match(split):
        raise UserError(f"--split {split!r} is not a plain name; use letters, digits, '_', '-' or '.', e.g. train")


# --------------------------------------------------------------------------- the export folder
def check_destination(out: Path, *, overwrite: bool) -> None:
    """Refuse an ``out`` that holds anything but an earlier export, and an earlier export without ``overwrite``."""
    try:
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file; give a folder")
        if not out.is_dir() or not any(out.iterdir()):
            return
        manifest = out / MANIFEST
        if not manifest.is_file():
            raise UserError(f"--out {out} holds files that are not a selftrain export; choose a new or empty folder")
        if not overwrite:
            raise UserError(f"--out {out} holds an earlier export ({_describe(manifest)}); pass --overwrite to "
                            "replace it or choose another folder")
    except OSError as exc:
        raise UserError(f"cannot read --out {out} ({_why(exc)}); choose another folder") from None


def _describe(manifest: Path) -> str:
    try:
        doc = json.loads(manifest.read_text())
        return f"{doc['export']} of round {doc['round']}"
    except (OSError, ValueError, KeyError, TypeError):
        return MANIFEST


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """An empty hidden folder beside ``out`` to write into. When the block succeeds it takes the place
    of ``out`` (new, empty, or an earlier export); when it fails it is deleted and ``out`` is untouched."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as exc:
        raise UserError(f"cannot create the export folder {out} ({_why(exc)}); choose another --out") from None
    try:
        yield staging
        _replace_folder(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace_folder(new: Path, out: Path) -> None:
    """Rename ``new`` onto ``out``; an earlier export there is moved aside first and deleted last."""
    os.chmod(new, 0o777 & ~_umask())  # mkdtemp makes 0700; give the folder the usual permissions
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.replace(new, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.replace(out, old)
    try:
        os.replace(new, out)
    except OSError:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _why(exc: OSError) -> str:
    return f"{exc.__class__.__name__}: {exc.strerror or exc}"


# --------------------------------------------------------------------------- the run's images
class TargetImages:
    """The run's target images, paired with a round by id: each image's file, or its pixels when the
    data set renders it in memory. ``root``: the data set's root (COCO file names are relative to it)."""

    def __init__(self, dataset: Any, *, task: str, root: str | None) -> None:
        self.dataset, self.task = dataset, task
        self.root = Path(os.path.abspath(root)) if root else None
        ids = getattr(dataset, "ids", None)  # every data set of the registries lists them; others are asked
        ids = list(ids) if ids is not None else [str(dataset[i]["id"]) for i in range(len(dataset))]
        self.index = {str(image_id): i for i, image_id in enumerate(ids)}

    @classmethod
    def of_recipe(cls, cfg: Any, reader: RoundReader) -> TargetImages:
        """The target set of the run's resolved recipe, checked to hold every image of the round."""
        from .build import build_target_dataset

        dataset, _ = build_target_dataset(cfg)
        images = cls(dataset, task=reader.task, root=cfg.data.target.root)
        missing = [i for i in reader.image_ids if i not in images.index]
        if missing:
            raise UserError(f"{len(missing)} images of round {reader.meta['round']} are not in the run's target set "
                            f"(first: {missing[0]!r}); restore the data the run used")
        return images

    def file(self, image_id: str) -> Path | None:
        """The image's file, or None when it is rendered in memory."""
        image_path = getattr(self.dataset, "image_path", None)  # a data set that does not say is rendered
        path = image_path(self.index[image_id]) if image_path is not None else None
        if path is not None and not Path(path).is_file():
            raise DataError(f"image {path} of the run's target set does not exist; restore the data the run used")
        return None if path is None else Path(path)

    def pixels(self, image_id: str) -> np.ndarray:
        """uint8 [H, W, 3] as the run read it."""
        image = self.dataset[self.index[image_id]]["image"]
        if self.task == "segmentation":
            from .data.datasets import to_image

            return to_image(image)
        return (image.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)

    def size(self, image_id: str) -> tuple[int, int]:
        """(H, W), from the file header when there is a file."""
        from .data.datasets import header_size

        file = self.file(image_id)
        return header_size(file) if file is not None else tuple(self.pixels(image_id).shape[:2])


@dataclass(frozen=True)
class Export:
    """One export under way: the round, the staging folder every file goes into, the absolute path the
    export will have (``final``), the split and image mode, the images, the target set's registry name."""

    reader: RoundReader
    out: Path
    final: Path
    split: str
    images: str
    target: TargetImages | None
    dataset: str
    run_name: str
    run: Path

    def suffix(self, image_id: str, encode: str = "png") -> str:
        """The extension the image keeps: its file's, or ``.png`` / ``.jpg`` for an image rendered in memory."""
        file = self.target.file(image_id) if self.target is not None else None
        return file.suffix if file is not None else f".{encode}"

    def place_image(self, image_id: str, dest: Path, encode: str = "png") -> None:
        """Link or copy the image's file to ``dest``, or encode its pixels there; nothing with ``--images none``."""
        if self.images == "none" or self.target is None:
            return
        file = self.target.file(image_id)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if file is None:
            with atomic_path(dest, suffix=dest.suffix) as tmp:
                Image.fromarray(self.target.pixels(image_id)).save(tmp, format="JPEG" if encode == "jpg" else "PNG",
                                                                   quality=95)
        elif self.images == "link":
            os.symlink(os.path.abspath(file), dest)
        else:
            with atomic_path(dest, suffix=dest.suffix) as tmp:
                shutil.copyfile(file, tmp)


def flat_names(image_ids: Sequence[str]) -> list[str]:
    """File stems for the flat layouts (png, voc): ``/`` becomes ``_``; two ids on one name is a UserError."""
    names = [image_id.replace("/", "_") for image_id in image_ids]
    _check_unique(names, image_ids)
    return names


def _check_unique(names: Sequence[Any], image_ids: Sequence[str]) -> None:
    seen: dict[Any, str] = {}
    for name, image_id in zip(names, image_ids):
        if name in seen:
            raise UserError(f"ids {seen[name]!r} and {image_id!r} would both be written as {name}; "
                            "export with another --format")
        seen[name] = image_id


def write_manifest(ex: Export, fmt: str, count: int) -> None:
    """``selftrain_export.json``, written last: what was exported, from where, how."""
    meta = ex.reader.meta
    doc = {"format": EXPORT_FORMAT, "export": fmt, "task": ex.reader.task, "run": str(ex.run),
           "round": int(meta["round"]), "policy": meta.get("policy"), "portion": float(meta.get("portion", 0)),
           "split": ex.split, "images": ex.images, "count": count, "class_names": list(meta["class_names"]),
           "selftrain_version": __version__, "created": _now()}
    write_text_atomic(ex.out / MANIFEST, json.dumps(doc, indent=2) + "\n")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _write_png(path: Path, array: np.ndarray) -> None:
    with atomic_path(path, suffix=".png.tmp") as tmp:
        Image.fromarray(np.ascontiguousarray(array.astype(np.uint8))).save(tmp, format="PNG")


# --------------------------------------------------------------------------- segmentation
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


def cityscapes_name(image_id: str, default_city: str) -> tuple[str, str]:
    """(city, stem) of an id: ``aachen/aachen_000000_000019`` -> ("aachen", "aachen_000000_000019");
    an id without a city folder goes into ``default_city``."""
    city, _, stem = image_id.rpartition("/")
    return city.replace("/", "_") or default_city, stem


def _labels_of(ex: Export, i: int) -> np.ndarray:
    """Labels of image ``i``, checked against the size of the image file placed beside them."""
    labels, image_id = ex.reader.labels(i), ex.reader.image_ids[i]
    if ex.images != "none" and ex.target is not None and ex.target.file(image_id) is not None:
        size = ex.target.size(image_id)
        if size != labels.shape:
            raise UserError(f"image {ex.target.file(image_id)} is {size[1]}x{size[0]} but its pseudo-labels are "
                            f"{labels.shape[1]}x{labels.shape[0]} (the data set resizes); export with --images none")
    return labels


def _export_png(ex: Export) -> int:
    ids = ex.reader.image_ids
    for i, (image_id, name) in enumerate(progress(list(zip(ids, flat_names(ids))), desc="export", unit="img")):
        _write_png(ex.out / "labels" / f"{name}.png", _labels_of(ex, i))
        ex.place_image(image_id, ex.out / "images" / f"{name}{ex.suffix(image_id)}")
    return len(ids)


def _export_cityscapes(ex: Export) -> int:
    ids = ex.reader.image_ids
    table = cityscapes_lookup(ex.reader.meta["class_names"], int(ex.reader.meta["ignore_index"]))
    names = [cityscapes_name(image_id, ex.dataset) for image_id in ids]
    _check_unique(names, ids)
    for i, (image_id, (city, stem)) in enumerate(progress(list(zip(ids, names)), desc="export", unit="img")):
        _write_png(ex.out / "gtFine" / ex.split / city / f"{stem}_gtFine_labelIds.png", table[_labels_of(ex, i)])
        ex.place_image(image_id, ex.out / "leftImg8bit" / ex.split / city / f"{stem}_leftImg8bit{ex.suffix(image_id)}")
    return len(ids)


# --------------------------------------------------------------------------- detection: VOC
def boxes_of(ex: Export, i: int) -> dict[str, np.ndarray]:
    """Pseudo-boxes of image ``i`` (see :meth:`RoundReader.boxes`), their labels checked to name a class."""
    found, k = ex.reader.boxes(i), len(ex.reader.meta["class_names"])
    bad = found["labels"][(found["labels"] < 1) | (found["labels"] > k)]
    if bad.size:
        raise UserError(f"{ex.reader.path} holds a box of label {int(bad[0])} for image {ex.reader.image_ids[i]!r}, "
                        f"outside 1..{k}; the file is corrupt: rerun the round")
    return found


def voc_pixels(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Continuous xyxy boxes [K, 4] -> VOC's integer pixel indices [K, 4] (xmin, ymin, xmax, ymax), int64.

    Pixel k (0-based) covers [k, k + 1); VOC numbers pixels from 1 and includes both ends. Each edge
    is rounded to the nearest pixel boundary (halves up) and clipped to the image of ``size`` (H, W),
    and a box keeps at least one pixel; then xmin = left edge + 1, xmax = right edge. The inverse,
    which :func:`selftrain.data.detsets.read_voc_xml` applies, is (xmin - 1, ymin - 1, xmax, ymax), so
    a VOC round trip returns each stored box with its edges rounded to whole pixels, exactly.
    """
    h, w = size
    edges = np.floor(np.asarray(boxes, np.float64).reshape(-1, 4) + 0.5).clip(0, [w, h, w, h])
    x0, y0 = np.minimum(edges[:, 0], w - 1), np.minimum(edges[:, 1], h - 1)
    x1, y1 = np.maximum(edges[:, 2], x0 + 1), np.maximum(edges[:, 3], y0 + 1)
    return np.stack([x0 + 1, y0 + 1, x1, y1], axis=1).astype(np.int64)


def voc_xml(*, folder: str, filename: str, source: dict[str, str], size: tuple[int, int],
            found: dict[str, np.ndarray], class_names: Sequence[str]) -> str:
    """One VOC annotation with the devkit's elements (``folder``, ``filename``, ``source``, ``size``,
    ``segmented``; per object ``name``, ``pose``, ``truncated``, ``difficult``, ``bndbox``) and the
    extra ``score`` (and ``srrs`` when set) that VOC readers ignore. ``size`` is (H, W); pose and
    truncation are unknown for pseudo-labels: ``Unspecified`` and 0."""
    root = ET.Element("annotation")
    _sub(root, "folder", folder)
    _sub(root, "filename", filename)
    src = ET.SubElement(root, "source")
    for tag, text in source.items():
        _sub(src, tag, text)
    dims = ET.SubElement(root, "size")
    for tag, value in (("width", size[1]), ("height", size[0]), ("depth", 3)):
        _sub(dims, tag, str(value))
    _sub(root, "segmented", "0")
    pixels = voc_pixels(found["boxes"], size)
    for box, label, score, srrs in zip(pixels, found["labels"], found["scores"], found["srrs"]):
        obj = ET.SubElement(root, "object")
        for tag, text in (("name", class_names[int(label) - 1]), ("pose", "Unspecified"), ("truncated", "0"),
                          ("difficult", "0")):
            _sub(obj, tag, text)
        bndbox = ET.SubElement(obj, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), box.tolist()):
            _sub(bndbox, tag, str(value))
        _sub(obj, "score", _float32_text(score))
        if np.isfinite(srrs):
            _sub(obj, "srrs", _float32_text(srrs))
    ET.indent(root, space="\t")
    return ET.tostring(root, encoding="unicode") + "\n"


def _sub(parent: ET.Element, tag: str, text: str) -> None:
    ET.SubElement(parent, tag).text = text


def _float32_text(value: Any) -> str:
    """The shortest decimal that reads back as the same float32."""
    return np.format_float_positional(np.float32(value), unique=True, trim="-")


def _export_voc(ex: Export) -> int:
    ids, names, meta = ex.reader.image_ids, flat_names(ex.reader.image_ids), ex.reader.meta
    source = {"database": f"selftrain pseudo-labels of {ex.dataset}",
              "annotation": f"{ex.run_name} round {meta['round']} ({meta.get('policy')})", "image": ex.dataset}
    not_jpeg = 0
    for i, (image_id, name) in enumerate(progress(list(zip(ids, names)), desc="export", unit="img")):
        filename = f"{name}{ex.suffix(image_id, 'jpg')}"
        not_jpeg += not filename.lower().endswith(".jpg")
        ex.place_image(image_id, ex.out / "JPEGImages" / filename, encode="jpg")
        xml = voc_xml(folder=ex.final.name, filename=filename, source=source, size=ex.target.size(image_id),
                      found=boxes_of(ex, i), class_names=meta["class_names"])
        write_text_atomic(ex.out / "Annotations" / f"{name}.xml", xml)
    write_text_atomic(ex.out / "ImageSets" / "Main" / f"{ex.split}.txt", "".join(f"{n}\n" for n in names))
    if not_jpeg:
        log.warning("%d images are not .jpg files and keep their format; readers that open JPEGImages/<id>.jpg "
                    "(torchvision's VOCDetection, py-faster-rcnn, mmdetection's VOCDataset) will not find them",
                    not_jpeg)
    return len(ids)


# --------------------------------------------------------------------------- detection: COCO
def coco_annotations(found: dict[str, np.ndarray], *, image: int, first_id: int) -> list[dict[str, Any]]:
    """COCO records for one image's boxes: ``bbox`` = [x, y, w, h] from the stored float32 xyxy (x + w
    gives the right edge back), ``score``, and ``srrs`` when the policy set it."""
    out = []
    for k, (box, label, score, srrs) in enumerate(zip(found["boxes"], found["labels"], found["scores"], found["srrs"])):
        x0, y0, x1, y1 = (float(v) for v in box)
        record = {"id": first_id + k, "image_id": image, "category_id": int(label), "bbox": [x0, y0, x1 - x0, y1 - y0],
                  "area": (x1 - x0) * (y1 - y0), "iscrowd": 0, "score": float(_float32_text(score))}
        if np.isfinite(srrs):
            record["srrs"] = float(_float32_text(srrs))
        out.append(record)
    return out


def coco_file_name(ex: Export, image_id: str) -> str:
    """The image's path relative to the data set's root, with POSIX separators; ``<id>.<ext>`` for an
    image rendered in memory or a file outside the root."""
    file = ex.target.file(image_id)
    relative = os.path.relpath(os.path.abspath(file), ex.target.root) if file and ex.target.root else os.pardir
    if relative.startswith(os.pardir):
        return f"{image_id.replace('/', '_')}{ex.suffix(image_id)}"
    return PurePosixPath(*Path(relative).parts).as_posix()


def _coco_image_root(ex: Export) -> str | None:
    if ex.images != "none":
        return str(ex.final / ex.split)
    ids = ex.reader.image_ids
    if ex.target.root is None or not ids or ex.target.file(ids[0]) is None:
        log.warning("the run's target images are rendered in memory and --images none writes none: the JSON's "
                    "file names resolve nowhere; export with --images copy to write them")
        return None
    return str(ex.target.root)


def _export_coco(ex: Export) -> int:
    images, annotations = [], []
    for i, image_id in enumerate(progress(ex.reader.image_ids, desc="export", unit="img")):
        file_name = coco_file_name(ex, image_id)
        ex.place_image(image_id, ex.out / ex.split / file_name)
        height, width = ex.target.size(image_id)
        images.append({"id": i + 1, "file_name": file_name, "height": int(height), "width": int(width), "license": 1})
        annotations += coco_annotations(boxes_of(ex, i), image=i + 1, first_id=len(annotations) + 1)
    meta = ex.reader.meta
    info = {"description": f"selftrain pseudo-labels of {ex.run_name}, round {meta['round']} ({meta.get('policy')}, "
                           f"portion {float(meta.get('portion', 0)):.2f}) on {ex.dataset}",
            "version": __version__, "year": _dt.date.today().year, "contributor": "selftrain", "url": "",
            "date_created": _now(), "image_root": _coco_image_root(ex)}
    doc = {"info": info, "licenses": [{"id": 1, "name": f"the license of the {ex.dataset} images", "url": ""}],
           "images": images, "annotations": annotations,
           "categories": [{"id": k + 1, "name": name, "supercategory": "none"}
                          for k, name in enumerate(meta["class_names"])]}
    write_text_atomic(ex.out / "annotations" / f"instances_{ex.split}.json", json.dumps(doc))
    return len(images)


WRITERS: dict[str, Callable[[Export], int]] = {"png": _export_png, "cityscapes": _export_cityscapes,
                                               "voc": _export_voc, "coco": _export_coco}
