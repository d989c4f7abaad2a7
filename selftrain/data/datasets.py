"""Segmentation data sets behind a registry. Every sample is ``{"image", "label", "id"}``.

``image`` is float32 [3, H, W] normalised with ImageNet statistics, ``label`` int64 [H, W] with
``ignore_index`` for unlabelled pixels (all-ignore when the split has no ground truth), ``id`` a
string that names the image in pseudo-label files. Data sets list their ``ids`` in order and
name each image's file with ``image_path(index)`` (None when the image is rendered in memory).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import DataError
from . import synth
from .registry import DATASETS

log = logging.getLogger(__name__)

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> normalised float32 [3, H, W]."""
    x = (image.astype(np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def to_image(tensor: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`to_tensor`: float32 [3, H, W] -> uint8 [H, W, 3]."""
    x = tensor.detach().cpu().numpy().transpose(1, 2, 0) * STD + MEAN
    return (x.clip(0, 1) * 255).round().astype(np.uint8)


def check_label(label: np.ndarray, num_classes: int, ignore_index: int, where: str) -> np.ndarray:
    """Reject label values outside ``[0, num_classes) + {ignore_index}``."""
    bad = (label >= num_classes) & (label != ignore_index)
    if bad.any():
        value = int(label[bad][0])
        raise DataError(
            f"label value {value} in {where} is out of range for {num_classes} classes; "
            f"fix data.num_classes or map the label to {ignore_index} (ignore)"
        )
    return label


def make_sample(image: np.ndarray, label: np.ndarray | None, image_id: str, ignore_index: int) -> dict[str, Any]:
    """The sample dict from arrays; no label means every pixel is ``ignore_index``."""
    if label is None:
        label = np.full(image.shape[:2], ignore_index, dtype=np.int64)
    return {"image": to_tensor(image), "label": torch.from_numpy(label.astype(np.int64)), "id": image_id}


@DATASETS.register("synth_street")
class SynthStreet(Dataset):
    """The embedded street-scene benchmark, rendered on the fly (see :mod:`selftrain.data.synth`).

    Args:
        split: ``source``, ``target_train`` or ``target_val``.
        num_images, seed, height, width: the benchmark's size and random stream.
        with_labels: return ground truth (target train ground truth is only used for reporting).
        cache: keep rendered images in memory (about 32 KB per 64x128 image) for repeated epochs.
    """

    class_names = synth.CLASS_NAMES

    def __init__(
        self, *, split: str, num_images: int = 600, seed: int = 0, height: int = 64, width: int = 128,
        with_labels: bool = True, ignore_index: int = 255, root: str | None = None, cache: bool = True,
    ) -> None:
        if split not in synth.SPLITS:
            raise DataError(f"synth_street split {split!r} is unknown; choose one of: {', '.join(synth.SPLITS)}")
        if root is not None:
            raise DataError("synth_street is generated in memory and takes no root; use the `folder` data set "
                            "for a benchmark written by `selftrain data synth`")
        self.split, self.num_images, self.seed = split, num_images, seed
        self.size = (height, width)
        self.with_labels, self.ignore_index = with_labels, ignore_index
        self.cache = cache
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.num_images

    @property
    def ids(self) -> list[str]:
        """Image ids in data-set order, as samples name them."""
        return [f"{self.split}_{i:05d}" for i in range(self.num_images)]

    def image_path(self, index: int) -> None:
        """None: the images are rendered in memory, there is no file to copy or link."""
        return None

    def _render(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        if index in self._cache:
            return self._cache[index]
        out = synth.render(self.split, index, seed=self.seed, height=self.size[0], width=self.size[1])
        if self.cache:
            self._cache[index] = out
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, label = self._render(index)
        return make_sample(image, label if self.with_labels else None, f"{self.split}_{index:05d}", self.ignore_index)

    def ground_truth(self, index: int) -> np.ndarray:
        """Ground truth of image ``index`` even when ``with_labels`` is off (for reporting only)."""
        return self._render(index)[1]


@DATASETS.register("folder")
class FolderDataset(Dataset):
    """``root/images/<id>.png`` with ``root/labels/<id>.png`` (class ids; optional), e.g. from
    ``selftrain data synth``. ``split`` names a sub-folder of ``root`` (empty string for none)."""

    def __init__(self, *, root: str | None, split: str = "", with_labels: bool = True,
                 num_classes: int | None = None, ignore_index: int = 255, class_names: list[str] | None = None) -> None:
        if not root:
            raise DataError("the folder data set needs a root; set data.<source|target>.root in the recipe")
        self.root = Path(root) / split if split else Path(root)
        image_dir = self.root / "images"
        if not image_dir.is_dir():
            raise DataError(f"data path {image_dir} does not exist; fix the recipe's root or write the data "
                            "with `selftrain data synth --out DIR`")
        self.images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.images:
            raise DataError(f"no images (*.png, *.jpg) in {image_dir}")
        self.with_labels, self.num_classes, self.ignore_index = with_labels, num_classes, ignore_index
        if class_names is not None:
            self.class_names = tuple(class_names)
        if with_labels:
            missing = [p.name for p in self.images if not self._label_path(p).is_file()]
            if missing:
                raise DataError(f"{len(missing)} images in {image_dir} have no label in {self.root / 'labels'} "
                                f"(first: {missing[0]}); add them or set with_labels: false")

    def _label_path(self, image_path: Path) -> Path:
        return self.root / "labels" / (image_path.stem + ".png")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def ids(self) -> list[str]:
        """Image ids (file stems) in data-set order."""
        return [p.stem for p in self.images]

    def image_path(self, index: int) -> Path:
        """The image file of ``index``."""
        return self.images[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.images[index]
        image = read_image(path, mode="RGB")
        label = self._read_label(path, image.shape[:2]) if self.with_labels else None
        return make_sample(image, label, path.stem, self.ignore_index)

    def ground_truth(self, index: int) -> np.ndarray | None:
        """Ground truth of image ``index`` when a label file exists (for reporting only)."""
        path = self.images[index]
        if not self._label_path(path).is_file():
            return None
        with Image.open(path) as im:
            size = (im.height, im.width)
        return self._read_label(path, size)

    def _read_label(self, image_path: Path, size: tuple[int, int]) -> np.ndarray:
        label_path = self._label_path(image_path)
        label = read_image(label_path, mode=None)
        if label.ndim != 2 or label.shape != size:
            raise DataError(f"label {label_path} has shape {label.shape}, its image {size}; "
                            "labels must be single-channel and the size of their image")
        if self.num_classes is not None:
            check_label(label, self.num_classes, self.ignore_index, str(label_path))
        return label


def read_image(path: Path, mode: str | None) -> np.ndarray:
    """Decode an image file; a corrupt or unreadable file is a DataError naming it."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode) if mode else im)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"cannot read image {path} ({exc.__class__.__name__}); replace or remove the file") from None


def header_size(path: Path) -> tuple[int, int]:
    """(height, width) from the image header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"cannot read image {path} ({exc.__class__.__name__}); replace or remove the file") from None


def build_dataset(name: str, *, root: str | None, split: str, options: dict[str, Any], num_classes: int,
                  ignore_index: int, with_labels: bool = True) -> Dataset:
    """Construct a registered data set; unknown options name the valid ones."""
    import inspect

    if root is not None and not Path(root).exists():
        raise DataError(f"data path {root} does not exist; put the {name} data set there or fix its root in the recipe")
    cls = DATASETS.get(name)
    params = inspect.signature(cls).parameters
    kwargs: dict[str, Any] = {"root": root, "split": split, "ignore_index": ignore_index, **options}
    if "num_classes" in params:
        kwargs["num_classes"] = num_classes
    if "with_labels" in params and "with_labels" not in options:
        kwargs["with_labels"] = with_labels
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        valid = sorted(set(params) - {"root", "split", "ignore_index"})
        raise DataError(f"data set {name} has no option {unknown[0]!r}; valid options: {', '.join(valid)}")
    return cls(**kwargs)
