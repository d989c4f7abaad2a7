"""Pseudo-label files: one HDF5 file per round, ``<run>/pseudo/round_{r:03d}.h5`` (DESIGN §5).

Root attributes: ``format="selftrain.pseudo/1"``, ``task``, ``round``, ``policy``, ``portion``,
``num_classes``, ``class_names``, ``ignore_index``, ``selftrain_version``, ``recipe`` (resolved
YAML), ``checkpoint``, ``created`` (ISO 8601, UTC) and, set last, ``complete=True``.

Segmentation files hold ``image_ids`` [N] (utf-8 str), ``labels`` uint8 [N, H, W] and
``confidence`` float16 [N, H, W] (chunks of one image, optional gzip/lzf), ``thresholds`` float32
[C], ``predicted_pixels`` / ``selected_pixels`` int64 [C] and optionally ``histogram`` [C, B].
All images of one file share one size: the writer takes ``image_shape`` or the first image's
size, and an image of another size is a ``ValueError`` (resize the pseudo-labels to one size,
or write another file). Confidence above float16's maximum (65504) is stored as 65504.

Detection files hold ``image_ids`` [N], ``offsets`` int64 [N+1] (image ``i`` owns rows
``offsets[i]:offsets[i+1]``), ``boxes`` float32 [M, 4] (xyxy pixels), ``labels`` int64 [M],
``scores`` float32 [M], ``srrs`` float32 [M] (NaN when the policy does not compute it) and
``thresholds`` when given.

The writer fills a temporary file beside the final name and renames it only in ``finish()``, so
a reader never sees a half-written round. The reader opens the file lazily and once per process,
so it can be handed to DataLoader workers (fork or spawn).

On open the reader checks every attribute (type and range) and every dataset (shape against the
ids and ``num_classes``, dtype), and refuses a file that fails with one StoreError line naming the
file, the problem and the fix; ``open_round(path, expect_task=..., expect_num_classes=...,
expect_round=..., expect_recipe=...)`` also refuses a sound file of another run.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np
import torch

from . import __version__
from .errors import StoreError
from .io import atomic_path

__all__ = ["FORMAT", "Expectation", "PseudoLabelWriter", "RoundMeta", "RoundReader", "merge_shards", "open_round",
           "recipe_sha256", "written_by"]

log = logging.getLogger(__name__)

FORMAT = "selftrain.pseudo/1"
TASKS = ("segmentation", "detection")
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_RESUME_HINT = "rerun the round with `selftrain run RECIPE --out RUN --resume`"


class _Discard(Exception):
    """Thrown into ``atomic_path`` to delete the temporary file without renaming it."""


def _to_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class RoundMeta:
    """The round a pseudo-label file belongs to, stored as its root attributes.

    ``task``: "segmentation" or "detection"; ``round``: the round index; ``policy`` and ``portion``
    that made the labels; ``num_classes`` / ``class_names`` / ``ignore_index`` of the label space;
    ``recipe``: the run's resolved YAML; ``checkpoint``: the model that labelled.
    """

    task: str
    round: int
    policy: str
    portion: float
    num_classes: int
    class_names: Sequence[str]
    ignore_index: int = 255
    recipe: str = ""
    checkpoint: str = ""

    def attrs(self) -> dict[str, Any]:
        return dict(task=self.task, round=int(self.round), policy=str(self.policy), portion=float(self.portion),
                    num_classes=int(self.num_classes), class_names=[str(n) for n in self.class_names],
                    ignore_index=int(self.ignore_index), recipe=str(self.recipe), checkpoint=str(self.checkpoint))

    @classmethod
    def from_attrs(cls, attrs: Any) -> RoundMeta:
        """The meta of a file a :class:`RoundReader` checked (its ``meta``)."""
        return cls(**{k: attrs[k] for k in ("task", "round", "policy", "portion", "num_classes", "class_names",
                                            "ignore_index", "recipe", "checkpoint")})


class PseudoLabelWriter:
    """Write one round's pseudo-labels; a context manager.

    ``finish()`` stores the statistics, sets ``complete=True`` last and renames the file into
    place. If the with-block raises, or ends without ``finish()``, the temporary file is deleted
    and any older file under the final name is left untouched (ending without ``finish()`` also
    raises ``RuntimeError``, because it is a bug in the caller). ``abort()`` discards on purpose.

    Args:
        path: final file name, usually ``<run>/pseudo/round_{r:03d}.h5``.
        meta: what the file's root attributes say about the round (:class:`RoundMeta`).
        image_shape: (H, W) shared by all segmentation images; default: the first image's.
        compression: "gzip", "lzf" or None for the per-image segmentation datasets.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        meta: RoundMeta,
        *,
        image_shape: tuple[int, int] | None = None,
        compression: str | None = "gzip",
    ) -> None:
        if not isinstance(meta, RoundMeta):
            raise TypeError(f"PseudoLabelWriter takes a RoundMeta after the path, got {type(meta).__name__}")
        task, num_classes, class_names = meta.task, meta.num_classes, meta.class_names
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if len(class_names) != num_classes:
            raise ValueError(f"num_classes={num_classes} but {len(class_names)} class_names were given")
        if compression not in ("gzip", "lzf", None):
            raise ValueError(f"compression must be 'gzip', 'lzf' or None, got {compression!r}")
        self.path = Path(path)
        self.task = task
        self.num_classes = int(num_classes)
        self._compression = compression
        self._ids: list[str] = []
        self._id_set: set[str] = set()
        self._offsets: list[int] = [0]
        self._image_shape: tuple[int, int] | None = None
        attrs = dict(format=FORMAT, **meta.attrs(), selftrain_version=__version__, created=_now())
        self._stack = contextlib.ExitStack()
        self._h5: h5py.File | None = self._open_tmp(attrs)
        if task == "segmentation" and image_shape is not None:
            self._create_segmentation(tuple(int(s) for s in image_shape))
        if task == "detection":
            self._create_detection()

    # -- context manager --------------------------------------------------------------------

    def __enter__(self) -> PseudoLabelWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._h5 is None:  # finished or aborted
            return
        self.abort()
        if exc_type is None:
            raise RuntimeError(f"PseudoLabelWriter for {self.path} closed without finish(); call finish() to keep it")

    def __len__(self) -> int:
        return len(self._ids)

    # -- adding -------------------------------------------------------------------------------

    def add_segmentation(self, image_id: str, labels: Any, confidence: Any) -> None:
        """Append one image: ``labels`` [H, W] integers in [0, 255], ``confidence`` [H, W] float."""
        labels, confidence = _to_numpy(labels), _to_numpy(confidence)
        if labels.ndim != 2 or confidence.shape != labels.shape:
            raise ValueError(
                f"image {image_id!r}: labels {labels.shape} and confidence {confidence.shape} must both be [H, W]"
            )
        self.add_segmentation_batch([image_id], labels[None], confidence[None])

    def add_segmentation_batch(self, image_ids: Sequence[str], labels: Any, confidence: Any) -> None:
        """Append B images at once (one resize and one write per dataset): ``labels`` [B, H, W]
        integers in [0, 255], ``confidence`` [B, H, W] float."""
        self._require_task("segmentation", "add_segmentation")
        labels, confidence = _to_numpy(labels), _to_numpy(confidence)
        first = repr(image_ids[0]) if len(image_ids) else "(none)"
        if labels.ndim != 3 or confidence.shape != labels.shape or len(image_ids) != labels.shape[0]:
            raise ValueError(f"images from {first}: labels {labels.shape} and confidence {confidence.shape} must "
                             f"both be [{len(image_ids)}, H, W]")
        if labels.size and (labels.min() < 0 or labels.max() > 255):
            raise ValueError(f"images from {first}: labels must lie in [0, 255] to be stored as uint8")
        if self._image_shape is None:
            self._create_segmentation(labels.shape[1:])
        if labels.shape[1:] != self._image_shape:
            raise ValueError(
                f"image {first} is {labels.shape[1]}x{labels.shape[2]} but this file stores "
                f"{self._image_shape[0]}x{self._image_shape[1]} images; resize the pseudo-labels to one size"
            )
        start = len(self._ids)
        for image_id in image_ids:
            self._add_id(image_id)
        for name, value in (("labels", labels.astype(np.uint8, copy=False)), ("confidence", _to_float16(confidence))):
            dataset = self._h5[name]
            dataset.resize(start + len(image_ids), axis=0)
            dataset[start:] = value

    def add_detection(self, image_id: str, boxes: Any, labels: Any, scores: Any, srrs: Any = None) -> None:
        """Append one image's K boxes: ``boxes`` [K, 4] xyxy, ``labels`` [K], ``scores`` [K],
        ``srrs`` [K] or None (stored as NaN). K may be 0."""
        self._require_task("detection", "add_detection")
        boxes = _to_numpy(boxes).astype(np.float32).reshape(-1, 4)
        k = boxes.shape[0]
        columns = {
            "boxes": boxes,
            "labels": _to_numpy(labels).astype(np.int64).reshape(-1),
            "scores": _to_numpy(scores).astype(np.float32).reshape(-1),
            "srrs": np.full(k, np.nan, np.float32) if srrs is None else _to_numpy(srrs).astype(np.float32).reshape(-1),
        }
        bad = {name: len(v) for name, v in columns.items() if len(v) != k}
        if bad:
            raise ValueError(f"image {image_id!r}: {k} boxes but lengths {bad}; give one label/score/srrs per box")
        self._add_id(image_id)
        start = self._offsets[-1]
        for name, value in columns.items():
            dataset = self._h5[name]
            dataset.resize(start + k, axis=0)
            dataset[start : start + k] = value
        self._offsets.append(start + k)

    # -- closing ------------------------------------------------------------------------------

    def finish(
        self,
        *,
        thresholds: Any = None,
        predicted_pixels: Any = None,
        selected_pixels: Any = None,
        histogram: Any = None,
    ) -> Path:
        """Store the round statistics ([C] each, ``histogram`` [C, B]), set ``complete=True``
        last, close and rename into place. Returns the final path."""
        h5 = self._require_open()
        arrays = {  # validated before anything is written, so a caller may fix and retry
            "thresholds": self._per_class("thresholds", thresholds, np.float32),
            "predicted_pixels": self._per_class("predicted_pixels", predicted_pixels, np.int64),
            "selected_pixels": self._per_class("selected_pixels", selected_pixels, np.int64),
            "histogram": self._histogram(histogram),
        }
        if self.task == "detection":
            arrays["offsets"] = np.asarray(self._offsets, dtype=np.int64)
        h5.create_dataset("image_ids", data=np.asarray(self._ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
        for name, array in arrays.items():
            if array is not None:
                h5.create_dataset(name, data=array)
        h5.attrs["complete"] = True
        h5.flush()
        h5.close()
        self._h5 = None
        self._stack.close()  # fsync + rename onto self.path
        log.debug("wrote %d %s pseudo-labels to %s", len(self._ids), self.task, self.path)
        return self.path

    def abort(self) -> None:
        """Discard everything written so far; the final name is not touched."""
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None
            self._stack.__exit__(_Discard, _Discard(), None)

    # -- helpers ------------------------------------------------------------------------------

    def _open_tmp(self, attrs: dict[str, Any]) -> h5py.File:
        """Create the temporary file beside ``self.path`` with the root attributes (not ``complete``)."""
        tmp = self._stack.enter_context(atomic_path(self.path, suffix=".h5.tmp"))
        h5 = None
        try:
            h5 = h5py.File(tmp, "w")
            h5.attrs.update(attrs)
        except BaseException:
            if h5 is not None:
                h5.close()
            self._stack.__exit__(*sys.exc_info())  # removes the temporary file, never renames it
            raise
        return h5

    def _require_open(self) -> h5py.File:
        if self._h5 is None:
            raise RuntimeError(f"PseudoLabelWriter for {self.path} is already finished or aborted")
        return self._h5

    def _require_task(self, task: str, method: str) -> None:
        self._require_open()
        if self.task != task:
            raise ValueError(f"{method}() needs a {task} writer; this one writes {self.task} to {self.path}")

    def _add_id(self, image_id: str) -> int:
        image_id = str(image_id)
        if image_id in self._id_set:
            raise ValueError(f"image id {image_id!r} was already added to {self.path}; image ids must be unique")
        self._id_set.add(image_id)
        self._ids.append(image_id)
        return len(self._ids) - 1

    def _create_segmentation(self, shape: tuple[int, int]) -> None:
        """Resizable [0, H, W] datasets, one chunk per image."""
        self._image_shape = (int(shape[0]), int(shape[1]))
        height, width = self._image_shape
        for name, dtype in (("labels", np.uint8), ("confidence", np.float16)):
            self._h5.create_dataset(
                name, shape=(0, height, width), maxshape=(None, height, width), dtype=dtype,
                chunks=(1, max(height, 1), max(width, 1)), compression=self._compression,
                compression_opts=1 if self._compression == "gzip" else None,  # fastest level: labels compress well anyway
            )  # fmt: skip

    def _create_detection(self) -> None:
        specs = {"boxes": ((0, 4), (None, 4), np.float32), "labels": ((0,), (None,), np.int64),
                 "scores": ((0,), (None,), np.float32), "srrs": ((0,), (None,), np.float32)}  # fmt: skip
        for name, (shape, maxshape, dtype) in specs.items():
            chunks = (4096,) + shape[1:]
            self._h5.create_dataset(name, shape=shape, maxshape=maxshape, dtype=dtype, chunks=chunks)

    def _per_class(self, name: str, value: Any, dtype: Any) -> np.ndarray | None:
        if value is None:
            return None
        array = _to_numpy(value).astype(dtype).reshape(-1)
        if array.shape != (self.num_classes,):
            raise ValueError(f"{name} has {array.size} values; give one per class ({self.num_classes})")
        return array

    def _histogram(self, value: Any) -> np.ndarray | None:
        if value is None:
            return None
        array = _to_numpy(value)
        if array.ndim != 2 or array.shape[0] != self.num_classes:
            raise ValueError(f"histogram has shape {array.shape}; give [num_classes={self.num_classes}, bins]")
        return array if np.issubdtype(array.dtype, np.integer) else array.astype(np.float64)


def _to_float16(confidence: np.ndarray) -> np.ndarray:
    """float16 with values beyond its range clipped to +-65504 (NaN kept)."""
    if confidence.dtype != np.float16:  # the labeller hands float16 already: no float32 copy of it
        confidence = confidence.astype(np.float32)
    return np.clip(confidence, -_FLOAT16_MAX, _FLOAT16_MAX).astype(np.float16, copy=False)


# ---------------------------------------------------------------------------------------------
# Reading

_DAMAGED = f"the file was edited or is damaged: delete it and {_RESUME_HINT}"
_FOREIGN = f"it belongs to another run: remove it from the run's pseudo/ folder and {_RESUME_HINT}"
# what h5py and numpy raise on a damaged file (RuntimeError: h5py's answer to a broken B-tree)
_READ_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError)


def recipe_sha256(recipe: str) -> str:
    """Hex sha256 of a resolved recipe's text: what ``expect_recipe_sha256`` is compared with."""
    return hashlib.sha256(recipe.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Expectation:
    """What the caller's run says a round file must hold; a field left None is not checked."""

    task: str | None = None
    num_classes: int | None = None
    class_names: Sequence[str] | None = None
    round: int | None = None
    recipe: str | None = None
    recipe_sha256: str | None = None

    def check(self, path: Path, meta: dict[str, Any]) -> None:
        """StoreError naming the first field of ``meta`` that disagrees with the run."""
        recipe_digest = recipe_sha256(meta["recipe"]) if self.recipe_sha256 is not None else None
        fields = (("task", self.task, meta["task"]), ("num_classes", self.num_classes, meta["num_classes"]),
                  ("class_names", _list(self.class_names), meta["class_names"]),
                  ("round", self.round, meta["round"]))  # fmt: skip
        for name, expected, found in fields:
            if expected is not None and expected != found:
                raise StoreError(f"{path} holds {name}={_short(found)} but the run expects {_short(expected)}; "
                                 f"{_FOREIGN}")
        if (self.recipe is not None and self.recipe != meta["recipe"]) or (
            self.recipe_sha256 is not None and self.recipe_sha256 != recipe_digest
        ):
            raise StoreError(f"{path} was written with another recipe than this run's config.yaml; {_FOREIGN}")


def written_by(path: str | os.PathLike, round_index: int, recipe: str) -> bool:
    """Whether ``path`` is a complete, sound round file of round ``round_index`` made with ``recipe``."""
    try:
        with open_round(path, expect_round=round_index, expect_recipe=recipe):
            return True
    except StoreError:
        return False


def open_round(
    path: str | os.PathLike,
    *,
    expect_task: str | None = None,
    expect_num_classes: int | None = None,
    expect_class_names: Sequence[str] | None = None,
    expect_round: int | None = None,
    expect_recipe: str | None = None,
    expect_recipe_sha256: str | None = None,
) -> RoundReader:
    """Open a complete pseudo-label file for reading; raises StoreError when it is missing, not
    HDF5, not a selftrain file, incomplete, damaged (attributes or datasets of the wrong type or
    shape) or, for each ``expect_*`` given, holds another task, class count, class names, round
    or recipe (the resolved YAML text, or its :func:`recipe_sha256`) than the caller's run."""
    expect = Expectation(task=expect_task, num_classes=expect_num_classes, class_names=expect_class_names,
                         round=expect_round, recipe=expect_recipe, recipe_sha256=expect_recipe_sha256)  # fmt: skip
    return RoundReader(path, expect=expect)


class RoundReader:
    """Read one round's pseudo-labels (see the module docstring for the layout).

    Opening checks every attribute and the shape and dtype of every dataset (and, for detection,
    offsets and box labels), so a file that opens is consistent; segmentation label values are
    checked as images are read. The small arrays (ids, offsets, statistics) are read once;
    per-image data is read on demand from an h5py handle opened lazily and again in each new
    process, so the reader pickles (the handle is dropped) and works inside DataLoader workers.
    """

    def __init__(self, path: str | os.PathLike, *, expect: Expectation | None = None) -> None:
        self.path = Path(path)
        self._h5: h5py.File | None = None
        self._pid: int | None = None
        h5 = self._open_checked()
        try:
            self.meta = _read_meta(self.path, h5)
            (expect or Expectation()).check(self.path, self.meta)
            contents = _read_contents(self.path, h5, self.meta)
        except _READ_ERRORS as exc:
            raise StoreError(f"{self.path} cannot be read ({_why(exc)}); {_DAMAGED}") from None
        finally:
            h5.close()
        self.task: str = self.meta["task"]
        self.image_ids: list[str] = contents["image_ids"]
        self.thresholds = contents.get("thresholds")
        self.predicted_pixels = contents.get("predicted_pixels")
        self.selected_pixels = contents.get("selected_pixels")
        self.histogram = contents.get("histogram")
        self._offsets = contents.get("offsets")
        self._image_shape: tuple[int, int] | None = contents.get("image_shape")
        self._index = {image_id: i for i, image_id in enumerate(self.image_ids)}

    def _open_checked(self) -> h5py.File:
        """Open the file and refuse anything that is not a complete selftrain pseudo-label file."""
        if not self.path.exists():
            raise StoreError(f"pseudo-label file {self.path} does not exist; run the round first (or {_RESUME_HINT})")
        if not self.path.is_file():
            raise StoreError(f"{self.path} is not a file; pass a <run>/pseudo/round_NNN.h5 file")
        try:
            if not h5py.is_hdf5(self.path):
                raise StoreError(f"{self.path} is not an HDF5 file; delete it and {_RESUME_HINT}")
            h5 = h5py.File(self.path, "r")
        except OSError as exc:
            raise StoreError(f"{self.path} is a corrupt HDF5 file ({_why(exc)}); delete it and {_RESUME_HINT}") \
                from None
        try:
            _check_header(self.path, h5)
        except StoreError:
            h5.close()
            raise
        except _READ_ERRORS as exc:
            h5.close()
            raise StoreError(f"{self.path} cannot be read ({_why(exc)}); {_DAMAGED}") from None
        return h5

    # -- access -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.image_ids)

    def index_of(self, image_id: str) -> int:
        """Position of ``image_id`` in the file; KeyError when absent."""
        try:
            return self._index[str(image_id)]
        except KeyError:
            raise KeyError(f"image id {image_id!r} is not in {self.path} ({len(self)} images)") from None

    def labels(self, i: int) -> np.ndarray:
        """Pseudo-labels of image ``i``: uint8 [H, W], ``ignore_index`` where not selected."""
        i = self._check_index(i)
        return self._checked_labels(self._image("labels", i), f"image {self.image_ids[i]!r}")

    def label_rows(self, start: int, stop: int | None) -> np.ndarray:
        """The stored ``labels`` rows ``start:stop``: [n, H, W] uint8 (segmentation) or [n] int64 box
        labels (detection); one read for a block of images or boxes."""
        rows = self._read("labels", slice(start, stop))
        return self._checked_labels(rows, f"images {start}..") if self.task == "segmentation" else rows

    @property
    def image_shape(self) -> tuple[int, int] | None:
        """(H, W) shared by every segmentation image of the file; None for detection or an empty file."""
        return self._image_shape

    def confidence(self, i: int) -> np.ndarray:
        """Softmax probability of each pixel's assigned class in image ``i`` (0 where ignored): float32 [H, W]."""
        return self._image("confidence", self._check_index(i)).astype(np.float32)

    def boxes(self, i: int) -> dict[str, np.ndarray]:
        """Pseudo-boxes of image ``i``: boxes float32 [K, 4], labels int64 [K], scores float32 [K],
        srrs float32 [K] (K may be 0)."""
        self._require_task("detection", "boxes")
        i = self._check_index(i)
        rows = slice(int(self._offsets[i]), int(self._offsets[i + 1]))
        dtypes = {"boxes": np.float32, "labels": np.int64, "scores": np.float32, "srrs": np.float32}
        return {name: self._read(name, rows).astype(dtype, copy=False) for name, dtype in dtypes.items()}

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5 = None
        self._pid = None

    def __enter__(self) -> RoundReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_h5"] = None
        state["_pid"] = None
        return state

    def __repr__(self) -> str:
        round_ = self.meta.get("round")
        return f"RoundReader({str(self.path)!r}, task={self.task!r}, round={round_}, images={len(self)})"

    # -- helpers ------------------------------------------------------------------------------

    def _file(self) -> h5py.File:
        """The h5py handle of this process (a forked child re-opens instead of sharing the parent's)."""
        if self._h5 is None or self._pid != os.getpid():
            try:
                self._h5 = h5py.File(self.path, "r")
            except OSError as exc:
                raise StoreError(f"{self.path} cannot be opened again ({_why(exc)}); {_DAMAGED}") from None
            self._pid = os.getpid()
        return self._h5

    def _read(self, name: str, rows: int | slice) -> np.ndarray:
        """Rows of one dataset; a damaged chunk is a StoreError naming the file."""
        try:
            return np.asarray(self._file()[name][rows])
        except _READ_ERRORS as exc:
            raise StoreError(f"{self.path} dataset {name!r} cannot be read ({_why(exc)}); {_DAMAGED}") from None

    def _image(self, name: str, i: int) -> np.ndarray:
        self._require_task("segmentation", name)
        return self._read(name, i)

    def _checked_labels(self, labels: np.ndarray, where: str) -> np.ndarray:
        """``labels`` unchanged when every value is a class or ``ignore_index``; a StoreError otherwise."""
        num_classes, ignore = self.meta["num_classes"], self.meta["ignore_index"]
        bad = (labels >= num_classes) & (labels != ignore)
        if bad.any():
            raise StoreError(f"{self.path} holds label {int(labels[bad][0])} in {where}, neither one of "
                             f"{num_classes} classes nor ignore_index {ignore}; {_DAMAGED}")
        return labels.astype(np.uint8, copy=False)

    def _check_index(self, i: int) -> int:
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"image index {i} out of range for {self.path} ({len(self)} images)")
        return i % len(self)

    def _require_task(self, task: str, method: str) -> None:
        if self.task != task:
            other = "labels()/confidence()" if self.task == "segmentation" else "boxes()"
            raise StoreError(
                f"{self.path} holds {self.task} pseudo-labels, {method}() reads {task} files; use {other}, "
                f"or point the recipe's task at a {task} run"
            )


def _check_header(path: Path, h5: h5py.File) -> None:
    fmt = _as_str(h5.attrs.get("format", ""))
    if fmt != FORMAT:
        raise StoreError(
            f"{path} is not a selftrain pseudo-label file (format {_short(fmt)}, expected {FORMAT!r}); "
            f"pass a <run>/pseudo/round_NNN.h5 written by this selftrain version"
        )
    complete = h5.attrs.get("complete", False)
    if not isinstance(complete, (bool, np.bool_)) or not complete:
        raise StoreError(f"{path} is incomplete (the writing run was interrupted); {_RESUME_HINT}")
    task = _as_str(h5.attrs.get("task", ""))
    if task not in TASKS:
        raise StoreError(f"{path} has task {_short(task)}, expected one of {TASKS}; delete it and {_RESUME_HINT}")


def _read_meta(path: Path, h5: h5py.File) -> dict[str, Any]:
    """Root attributes as plain Python values, each checked (class_names: list[str], recipe: str)."""
    meta = {key: _plain(value) for key, value in h5.attrs.items()}
    for key, minimum in (("round", 0), ("num_classes", 1), ("ignore_index", 0)):
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise _damaged(path, f"attribute {key!r} is {_short(value)}, expected an integer >= {minimum}")
    for key in ("policy", "recipe"):
        if not isinstance(meta.get(key), str):
            raise _damaged(path, f"attribute {key!r} is {_short(meta.get(key))}, expected text")
    portion = meta.get("portion")
    if isinstance(portion, bool) or not isinstance(portion, (int, float)) or not 0 <= portion <= 1:
        raise _damaged(path, f"attribute 'portion' is {_short(portion)}, expected a number in [0, 1]")
    names, num_classes = meta.get("class_names"), meta["num_classes"]
    if not isinstance(names, list) or len(names) != num_classes or not all(isinstance(n, str) for n in names):
        raise _damaged(path, f"attribute 'class_names' is {_short(names)}, expected {num_classes} names (num_classes)")
    ignore = meta["ignore_index"]
    if meta["task"] == "segmentation" and not num_classes <= ignore <= 255:
        raise _damaged(path, f"ignore_index {ignore} must lie in [num_classes={num_classes}, 255] for uint8 labels")
    meta["task"] = _as_str(meta["task"])
    return meta


def _read_contents(path: Path, h5: h5py.File, meta: dict[str, Any]) -> dict[str, Any]:
    """The small arrays, each dataset's shape and dtype checked against the ids and num_classes."""
    ids_dataset = _dataset(path, h5, "image_ids", (None,), "text", required=True)
    image_ids = [_as_str(x) for x in ids_dataset[()]]
    if len(set(image_ids)) != len(image_ids):
        repeated = next(i for i in image_ids if image_ids.count(i) > 1)
        raise _damaged(path, f"image id {_short(repeated)} appears more than once in 'image_ids'")
    n, c = len(image_ids), meta["num_classes"]
    out: dict[str, Any] = {"image_ids": image_ids}
    for name, shape, kind in (("thresholds", (c,), "float"), ("predicted_pixels", (c,), "integer"),
                              ("selected_pixels", (c,), "integer"), ("histogram", (c, None), "number")):
        dataset = _dataset(path, h5, name, shape, kind, required=False)
        if dataset is not None:
            out[name] = dataset[()]
    if meta["task"] == "segmentation":
        out["image_shape"] = _segmentation_shape(path, h5, n)
    else:
        out["offsets"] = _detection_offsets(path, h5, n, c)
    return out


def _segmentation_shape(path: Path, h5: h5py.File, n: int) -> tuple[int, int] | None:
    """(H, W) of the ``labels`` and ``confidence`` stacks [N, H, W]; None for a file without images."""
    labels = _dataset(path, h5, "labels", (n, None, None), "uint8", required=n > 0)
    confidence = _dataset(path, h5, "confidence", (n, None, None), "float", required=n > 0 or labels is not None)
    if labels is None:
        if confidence is not None:
            raise _damaged(path, "has a 'confidence' dataset but no 'labels'")
        return None
    if confidence.shape != labels.shape:
        raise _damaged(path, f"'labels' {labels.shape} and 'confidence' {confidence.shape} differ in shape")
    return int(labels.shape[1]), int(labels.shape[2])


def _detection_offsets(path: Path, h5: h5py.File, n: int, num_classes: int) -> np.ndarray:
    """``offsets`` [N+1], checked to run from 0 to the box count without going back; box labels 1..C."""
    offsets = _dataset(path, h5, "offsets", (n + 1,), "integer", required=True)[()].astype(np.int64)
    boxes = _dataset(path, h5, "boxes", (None, 4), "float", required=True)
    m = boxes.shape[0]
    for name, kind in (("labels", "integer"), ("scores", "float"), ("srrs", "float")):
        _dataset(path, h5, name, (m,), kind, required=True)
    if offsets[0] != 0 or offsets[-1] != m or (np.diff(offsets) < 0).any():
        raise _damaged(path, f"'offsets' {_short(offsets.tolist())} must rise from 0 to the {m} boxes")
    labels = h5["labels"][()]
    bad = labels[(labels < 1) | (labels > num_classes)]
    if bad.size:
        raise _damaged(path, f"holds a box of label {int(bad[0])}, outside 1..{num_classes}")
    return offsets


_DTYPES = {
    "uint8": lambda d: d == np.uint8,
    "integer": lambda d: d.kind in "iu",
    "float": lambda d: d.kind == "f",
    "number": lambda d: d.kind in "iuf",
    "text": lambda d: h5py.check_string_dtype(d) is not None,
}


def _dataset(path: Path, h5: h5py.File, name: str, shape: tuple[int | None, ...], dtype: str, *,
             required: bool) -> h5py.Dataset | None:
    """Dataset ``name`` checked for ``shape`` (None: any length) and ``dtype`` (a ``_DTYPES`` key)."""
    dataset = h5.get(name)
    if dataset is None:
        if required:
            raise _damaged(path, f"has no {name!r} dataset")
        return None
    if not isinstance(dataset, h5py.Dataset):
        raise _damaged(path, f"{name!r} is not a dataset")
    wanted = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
    if len(dataset.shape) != len(shape) or any(s is not None and s != d for s, d in zip(shape, dataset.shape)):
        raise _damaged(path, f"dataset {name!r} has shape {list(dataset.shape)}, expected {wanted}")
    if not _DTYPES[dtype](dataset.dtype):
        raise _damaged(path, f"dataset {name!r} has dtype {dataset.dtype}, expected {dtype}")
    return dataset


def _damaged(path: Path, what: str) -> StoreError:
    return StoreError(f"{path}: {what}; {_DAMAGED}")


def _why(exc: BaseException) -> str:
    """An exception as one short line."""
    text = " ".join(str(exc).split())
    return f"{exc.__class__.__name__}: {text[:200]}" if text else exc.__class__.__name__


def _short(value: Any) -> str:
    """``repr`` of a value from a file, cut to one short line."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


def _list(values: Sequence[str] | None) -> list[str] | None:
    return None if values is None else [str(v) for v in values]


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value


def _as_str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def merge_shards(shards: Sequence[str | os.PathLike], path: str | os.PathLike) -> Path:
    """Publish one round file from the shard files of several processes, in the order given.

    Every shard is opened and checked first (a missing, incomplete or damaged shard is a
    StoreError and ``path`` is not touched); the shards must describe the same round (root
    attributes and round statistics), which the labelling processes wrote already reduced over
    all of them. The merged file is written atomically like any round file; the shards are left
    for the caller to delete. Cost: one read and one write of every label and confidence map
    (at 1024x2048 about 6 MB per image before compression).
    """
    readers = [RoundReader(s) for s in shards]
    try:
        first = readers[0]
        for reader in readers[1:]:
            _same_round(first, reader)
        with PseudoLabelWriter(path, RoundMeta.from_attrs(first.meta), image_shape=first.image_shape) as writer:
            for reader in readers:
                _copy_images(reader, writer)
            return writer.finish(thresholds=first.thresholds, predicted_pixels=first.predicted_pixels,
                                 selected_pixels=first.selected_pixels, histogram=first.histogram)
    finally:
        for reader in readers:
            reader.close()


def _same_round(a: RoundReader, b: RoundReader) -> None:
    keys = ("task", "round", "policy", "portion", "num_classes", "class_names", "ignore_index", "recipe")
    differ = [k for k in keys if a.meta[k] != b.meta[k]]
    stats = ("thresholds", "predicted_pixels", "selected_pixels")
    differ += [k for k in stats if (getattr(a, k) is None) != (getattr(b, k) is None)
               or (getattr(a, k) is not None and not np.array_equal(getattr(a, k), getattr(b, k)))]
    if differ:
        raise StoreError(f"shards {a.path} and {b.path} disagree on {', '.join(differ)}; they are not one round: "
                         f"delete the shards and {_RESUME_HINT}")


def _copy_images(reader: RoundReader, writer: PseudoLabelWriter) -> None:
    for i, image_id in enumerate(reader.image_ids):
        if reader.task == "segmentation":
            writer.add_segmentation(image_id, reader.labels(i), reader.confidence(i))
        else:
            b = reader.boxes(i)
            writer.add_detection(image_id, b["boxes"], b["labels"], b["scores"], b["srrs"])
