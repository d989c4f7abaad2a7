"""The real segmentation data sets of CBST (Zou et al., ECCV 2018, arXiv:1810.07911): shared code, GTA5, SYNTHIA.

Each data set reads its official layout; :mod:`selftrain.data.cityscapes` holds the ones labelled in
the Cityscapes class space (cityscapes, foggy_cityscapes, nthu, bdd100k) and the class-merging
tables. Labels come out as class ids through explicit lookup tables: Cityscapes label ids -> 19
train ids (the official table of ``cityscapesscripts``), SYNTHIA ids -> 16 classes.

Every data set takes ``list_file`` (ids, one per line, selecting a subset), ``with_labels``,
``ignore_index`` and ``num_classes``, has ``class_names`` and ``ids``, and offers ``label(i)``
(the mapped label without decoding the image), ``ground_truth(i)`` for reporting and
``image_path(i)`` (the image file, for exports that copy or link it).
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError
from ..metrics import miou_subset  # noqa: F401  (the SYNTHIA mIoU*, with SYNTHIA_13)
from .datasets import IMAGE_SUFFIXES, check_label, header_size, make_sample, read_image
from .registry import DATASETS

log = logging.getLogger(__name__)

# Names follow the Cityscapes label table so that they agree across class spaces.
SYNTHIA_16_NAMES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                    "vegetation", "sky", "person", "rider", "car", "bus", "motorcycle", "bicycle")
# mIoU* of the SYNTHIA benchmark: the 13 classes without wall, fence and pole.
SYNTHIA_13 = tuple(i for i, n in enumerate(SYNTHIA_16_NAMES) if n not in ("wall", "fence", "pole"))
# SYNTHIA-RAND-CITYSCAPES class ids as listed in the data set's README.
SYNTHIA_RAW_NAMES = {
    0: "void", 1: "sky", 2: "building", 3: "road", 4: "sidewalk", 5: "fence", 6: "vegetation", 7: "pole",
    8: "car", 9: "traffic sign", 10: "pedestrian", 11: "bicycle", 12: "motorcycle", 13: "parking-slot",
    14: "road-work", 15: "traffic light", 16: "terrain", 17: "rider", 18: "truck", 19: "bus", 20: "train",
    21: "wall", 22: "lanemarking",
}
# SYNTHIA id -> index in SYNTHIA_16_NAMES; every id not listed is ignored (255).
SYNTHIA_TO_16 = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 9, 10: 10, 17: 11, 8: 12, 19: 13,
                 12: 14, 11: 15}


def table_lut(table: dict[int, int]) -> np.ndarray:
    """uint8 [256] lookup table from an explicit ``{raw value: class}`` table; others -> 255."""
    lut = np.full(256, 255, dtype=np.uint8)
    for raw, cls in table.items():
        lut[raw] = cls
    lut.flags.writeable = False
    return lut


def _cityscapes_labels() -> list[Any]:
    try:
        from cityscapesscripts.helpers.labels import labels
    except ImportError:
        raise DataError("the Cityscapes label table comes from the cityscapesScripts package; "
                        "install it with `pip install cityscapesScripts`") from None
    return list(labels)


@functools.cache
def cityscapes_lut() -> np.ndarray:
    """uint8 [256]: Cityscapes label id -> train id (0..18, 255 ignore), from the official table."""
    table = {lab.id: lab.trainId for lab in _cityscapes_labels() if 0 <= lab.id < 255 and 0 <= lab.trainId < 255}
    return table_lut(table)


@functools.cache
def cityscapes_names() -> tuple[str, ...]:
    """The 19 Cityscapes class names in train-id order, from the official table."""
    by_train_id = {lab.trainId: lab.name for lab in _cityscapes_labels() if 0 <= lab.trainId < 255}
    return tuple(by_train_id[i] for i in range(len(by_train_id)))


# ---------------------------------------------------------------------------------------------
# Construction helpers


@dataclass(frozen=True)
class Pair:
    """One image: its id, the image file and the label file it should have (None: the split has none)."""

    id: str
    image: Path
    label: Path | None


def need_root(root: str | None, name: str) -> Path:
    if not root:
        raise DataError(f"the {name} data set needs a root; set data.<source|target|target_val>.root in the recipe")
    return Path(root)


def need_split(split: str, valid: Sequence[str], name: str) -> str:
    if split not in valid:
        shown = ", ".join(repr(s) for s in valid)
        raise DataError(f"{name} split {split!r} is unknown; set the recipe's split to one of: {shown}")
    return split


def need_dir(path: Path, name: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{name} folder {path} does not exist; point root at the {name} data set "
                        "in its official layout")
    return path


def list_images(folder: Path, pattern: str) -> list[Path]:
    """Sorted image files (png, jpg) under ``folder`` matching the glob ``pattern``."""
    return sorted(p for p in folder.glob(pattern) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


_TAG = re.compile(r"_leftImg8bit(_foggy_beta_[0-9.]+)?$")


def normalise_id(line: str) -> str:
    """A list-file line as an id: first field, no image extension, no Cityscapes ``_leftImg8bit`` tag."""
    token = line.split()[0]
    for suffix in IMAGE_SUFFIXES:
        if token.lower().endswith(suffix):
            token = token[: -len(suffix)]
    return _TAG.sub("", token)


def lookup(pairs: list[Pair]) -> dict[str, Pair]:
    """Pairs by id and by the id's last path component where that is unambiguous."""
    by_id = {p.id: p for p in pairs}
    short: dict[str, list[Pair]] = {}
    for p in pairs:
        short.setdefault(p.id.rsplit("/", 1)[-1], []).append(p)
    return {**{k: v[0] for k, v in short.items() if len(v) == 1}, **by_id}


def find_id(token: str, table: dict[str, Pair]) -> Pair | None:
    """The pair that ``token`` names; leading folders (``leftImg8bit/val/...``) are dropped until one matches."""
    parts = token.strip("/").split("/")
    for start in range(len(parts)):
        pair = table.get("/".join(parts[start:]))
        if pair is not None:
            return pair
    return None


def select_ids(pairs: list[Pair], list_file: str | Path, where: str) -> list[Pair]:
    """The pairs that ``list_file`` names, in the file's order (as the detection data sets keep it);
    an unknown or repeated id is an error."""
    path = Path(list_file)
    if not path.is_file():
        raise DataError(f"list_file {path} does not exist; fix data.<...>.options.list_file in the recipe")
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise DataError(f"list_file {path} lists no ids; write one image id per line")
    table = lookup(pairs)
    found = [(line, find_id(normalise_id(line), table)) for line in lines]
    missing = [line.strip() for line, pair in found if pair is None]
    if missing:
        raise DataError(f"list_file {path} names {len(missing)} ids that are not in {where} "
                        f"(first: {missing[0]}); fix the list or the recipe's split")
    chosen, seen = [pair for _, pair in found], set()
    for pair in chosen:
        if pair.id in seen:
            raise DataError(f"list_file {path} names image {pair.id} twice; list each image once")
        seen.add(pair.id)
    return chosen


def subset(pairs: list[Pair], list_file: str | Path | None, where: str) -> list[Pair]:
    """Refuse an empty split, then apply ``list_file`` when given."""
    if not pairs:
        raise DataError(f"no images in {where}; check the root and the split")
    return select_ids(pairs, list_file, where) if list_file is not None else pairs


def check_labels_exist(pairs: list[Pair], where: str) -> None:
    missing = [p for p in pairs if p.label is None or not p.label.is_file()]
    if missing:
        first = missing[0]
        expected = f"expected {first.label}" if first.label is not None else "this split has no labels"
        raise DataError(f"{len(missing)} images of {where} have no label (first: {first.image}, {expected}); "
                        "add the labels or set with_labels: false")


def parse_resize(resize: Sequence[int] | None) -> tuple[int, int] | None:
    if resize is None:
        return None
    if len(resize) != 2 or not all(isinstance(v, int) and v > 0 for v in resize):
        raise DataError(f"resize must be [height, width] in pixels, e.g. [1052, 1914]; got {resize!r}")
    return int(resize[0]), int(resize[1])


# ---------------------------------------------------------------------------------------------
# Base class


class PairedDataset(Dataset):
    """Shared behaviour of the real data sets: subset, label checks, label mapping, resizing.

    A sample is ``{"image": float32 [3, H, W], "label": int64 [H, W], "id": str}`` (see
    :func:`selftrain.data.datasets.make_sample`).

    Args:
        pairs: every image of the split, sorted by id.
        where: the split in words, for messages (``"cityscapes val (/data/leftImg8bit/val)"``).
        lut: uint8 [256] raw label value -> class (255 ignore); None keeps the values.
        class_names: one name per class.
        list_file: text file of ids to keep, one per line (see :func:`select_ids`).
        with_labels: return ground truth in samples; every image must then have its label file.
        num_classes: when given, a mapped label value outside ``[0, num_classes)`` is an error.
        ignore_index: the value of ignored pixels in samples (255 in the files and tables).
        resize: optional [H, W]: images bilinear, labels nearest neighbour.
        raw_values: label files hold values below this (Cityscapes label ids: 34); a larger value is
            an error, not an ignored pixel (a file of another data set or a damaged one).
    """

    def __init__(self, *, pairs: list[Pair], where: str, lut: np.ndarray | None, class_names: Sequence[str],
                 list_file: str | None = None, with_labels: bool = True, num_classes: int | None = None,
                 ignore_index: int = 255, resize: Sequence[int] | None = None, raw_values: int | None = None) -> None:
        self.pairs = subset(pairs, list_file, where)
        if with_labels:
            check_labels_exist(self.pairs, where)
        self.where, self.lut, self.class_names = where, lut, tuple(class_names)
        self.with_labels, self.num_classes, self.ignore_index = with_labels, num_classes, ignore_index
        self.resize = parse_resize(resize)
        self.raw_values = raw_values

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def image_path(self, index: int) -> Path:
        """The image file of ``index`` (as stored: before any ``resize``)."""
        return self.pairs[index].image

    def __getitem__(self, index: int) -> dict[str, Any]:
        pair = self.pairs[index]
        image = read_image(pair.image, mode="RGB")
        label = self._mapped_label(pair, image.shape[:2]) if self.with_labels else None
        if self.resize is not None:
            size = (self.resize[1], self.resize[0])
            image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
        return make_sample(image, label, pair.id, self.ignore_index)

    def label(self, index: int) -> np.ndarray | None:
        """Mapped label int64 [H, W] of image ``index`` without decoding the image; None without a label file."""
        pair = self.pairs[index]
        if pair.label is None or not pair.label.is_file():
            return None
        return self._mapped_label(pair, None)

    def ground_truth(self, index: int) -> np.ndarray | None:
        """Ground truth of image ``index`` even when ``with_labels`` is off (for reporting only)."""
        return self.label(index)

    def read_raw_label(self, path: Path) -> np.ndarray:
        """The label file as stored: [H, W] integers (palette indices or grey values)."""
        return read_image(path, mode=None)

    def _mapped_label(self, pair: Pair, image_size: tuple[int, int] | None) -> np.ndarray:
        raw = self.read_raw_label(pair.label)
        if raw.ndim != 2 or (image_size is not None and raw.shape != image_size):
            raise DataError(f"label {pair.label} has shape {raw.shape}, its image {image_size}; labels must be "
                            "single-channel and the size of their image")
        if self.raw_values is not None and raw.size and int(raw.max()) >= self.raw_values:
            raise DataError(f"label {pair.label} holds the value {int(raw.max())}, above the largest label id "
                            f"{self.raw_values - 1} of {self.where.split()[0]}; replace the file with the data "
                            "set's own label file")
        mapped = raw if self.lut is None else self.lut[np.clip(raw, 0, 255)]
        if self.resize is not None:
            size = (self.resize[1], self.resize[0])
            mapped = np.asarray(Image.fromarray(mapped.astype(np.int32)).resize(size, Image.Resampling.NEAREST))
        label = mapped.astype(np.int64)
        if self.ignore_index != 255:
            label[label == 255] = self.ignore_index
        if self.num_classes is not None:
            check_label(label, self.num_classes, self.ignore_index, str(pair.label))
        return label


# ---------------------------------------------------------------------------------------------
# Data sets


def drop_mismatched(pairs: list[Pair], name: str) -> list[Pair]:
    """Pairs whose image and label sizes agree, read from the PNG headers; the others skipped with one warning."""
    bad = {p.id for p in pairs if p.label is not None and p.label.is_file()
           and header_size(p.image) != header_size(p.label)}
    if bad:
        log.warning("%s: skipping %d image/label pairs whose sizes differ: %s", name, len(bad), ", ".join(sorted(bad)))
    return [p for p in pairs if p.id not in bad]


@DATASETS.register("gta5")
class GTA5(PairedDataset):
    """GTA5 (Richter et al., ECCV 2016): ``root/images/NNNNN.png`` with ``root/labels/NNNNN.png``.

    Labels hold Cityscapes label ids, mapped to the 19 train ids by the official table. A few pairs
    of the public release differ in size between image and label: they are found from the PNG
    headers at construction (no decoding) and skipped, with one warning that lists them.
    ``resize: [H, W]`` resizes images bilinearly and labels by nearest neighbour (the official CBST
    code trains on [1052, 1914]). The release has no splits: leave ``split`` empty and select
    images with ``list_file``.
    """

    def __init__(self, *, root: str | None, split: str = "", list_file: str | None = None,
                 resize: Sequence[int] | None = None, with_labels: bool = True, num_classes: int | None = None,
                 ignore_index: int = 255) -> None:
        base = need_root(root, "gta5")
        need_split(split, ("", "all"), "gta5")
        image_dir = need_dir(base / "images", "gta5")
        label_dir = need_dir(base / "labels", "gta5") if with_labels else base / "labels"
        where = f"gta5 ({image_dir})"
        pairs = [Pair(p.stem, p, label_dir / (p.stem + ".png")) for p in list_images(image_dir, "*.png")]
        pairs = drop_mismatched(subset(pairs, list_file, where), "gta5")
        super().__init__(pairs=pairs, where=where, lut=cityscapes_lut(), class_names=cityscapes_names(),
                         with_labels=with_labels, num_classes=num_classes, ignore_index=ignore_index, resize=resize)


def read_synthia_label(path: Path) -> np.ndarray:
    """SYNTHIA class ids uint16 [H, W]: the first (red) channel of the 16-bit label PNG.

    OpenCV returns channels in BGR order, so the PNG's first channel is index 2 of
    ``cv2.imread(path, cv2.IMREAD_UNCHANGED)``, as in the public loaders that read
    ``cv2.imread(p, -1)[:, :, 2]`` or, in RGB order, ``imageio.imread(p, format="PNG-FI")[:, :, 0]``.
    The second channel holds instance ids. Pillow is no option: it keeps only the high byte of
    16-bit colour PNGs, which turns every class id into 0.
    """
    try:
        import cv2
    except ImportError:
        raise DataError("SYNTHIA labels are 16-bit PNGs read with OpenCV; install it with "
                        "`pip install opencv-python-headless`") from None
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise DataError(f"cannot read label {path}; replace or remove the file")
    if raw.ndim != 3 or raw.shape[2] < 3:
        raise DataError(f"label {path} has shape {raw.shape}; expected the 3-channel 16-bit PNG of "
                        "SYNTHIA-RAND-CITYSCAPES GT/LABELS, not a converted label map")
    return raw[:, :, 2]


@DATASETS.register("synthia")
class Synthia(PairedDataset):
    """SYNTHIA-RAND-CITYSCAPES (Ros et al., CVPR 2016): ``root/RGB/NNNNNNN.png`` with ``root/GT/LABELS/NNNNNNN.png``.

    Labels are mapped to the 16 classes shared with Cityscapes by ``SYNTHIA_TO_16`` (everything
    else 255); report mIoU* over ``SYNTHIA_13`` with :func:`miou_subset`. No splits: leave
    ``split`` empty and select images with ``list_file``.
    """

    def __init__(self, *, root: str | None, split: str = "", list_file: str | None = None,
                 with_labels: bool = True, num_classes: int | None = None, ignore_index: int = 255) -> None:
        base = need_root(root, "synthia")
        need_split(split, ("", "all"), "synthia")
        image_dir = need_dir(base / "RGB", "synthia")
        label_dir = need_dir(base / "GT" / "LABELS", "synthia") if with_labels else base / "GT" / "LABELS"
        pairs = [Pair(p.stem, p, label_dir / p.name) for p in list_images(image_dir, "*.png")]
        super().__init__(pairs=pairs, where=f"synthia ({image_dir})", lut=table_lut(SYNTHIA_TO_16),
                         class_names=SYNTHIA_16_NAMES, list_file=list_file, with_labels=with_labels,
                         num_classes=num_classes, ignore_index=ignore_index)

    def read_raw_label(self, path: Path) -> np.ndarray:
        return read_synthia_label(path)

