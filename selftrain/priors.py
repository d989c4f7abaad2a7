"""Spatial priors for CBST-SP (Zou et al., "Unsupervised Domain Adaptation for Semantic
Segmentation via Class-Balanced Self-Training", ECCV 2018, arXiv:1810.07911, §4.4).

A spatial prior ``q`` [C, H, W] says where each class tends to appear in the source images:
``q_n(c)`` is the frequency of class ``c`` at pixel ``n``, smoothed with a Gaussian kernel and
normalised so that every class map sums to one over the pixels (``sum_n q_n(c) = 1``).
CBST-SP multiplies the softmax output by ``q`` before computing thresholds and selecting labels.

How the prior is computed (:func:`build_spatial_prior`):

1. Every label map is brought to the prior's size ``(H, W)`` with nearest-neighbour sampling at
   pixel centres (source index ``floor((i + 0.5) * H_in / H)``), so no label is ever blended.
2. Per pixel, the labelled maps vote: ``count[c, n]`` counts the maps whose pixel ``n`` has class
   ``c``; ``ignore_index`` pixels do not vote. The frequency is ``count[c, n] / valid[n]`` where
   ``valid[n]`` is the number of maps whose pixel ``n`` is not ignored (0 where none are), so an
   often-ignored region (an ego-vehicle hood) is not mistaken for a rare one.
3. Each class map is smoothed by a separable Gaussian (``scipy.ndimage.correlate1d`` along rows
   then columns, ``mode="reflect"``: the border is mirrored including the edge pixel, OpenCV's
   ``BORDER_REFLECT``). ``sigma`` follows OpenCV's rule for a kernel of ``ksize`` taps,
   ``sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8`` (10.85 for the paper's 70), and the kernel is
   truncated to ``ksize`` taps. An even ``ksize`` (the paper's 70) gets one extra tap
   (``2 * (ksize // 2) + 1``) so that the kernel has a centre pixel and the prior is not shifted
   by half a pixel; the tap at the edge weighs ``exp(-0.5 * (35 / 10.85)**2) ~ 0.5%`` of the centre.
4. Each class map is divided by its sum. A class that never occurs gets a uniform map ``1 / (H*W)``.

Kernel size and resolution: the paper's 70 x 70 kernel is for full-resolution street frames
(GTA5 1052 x 1914, Cityscapes 1024 x 2048), that is about 1024 px high. For a prior built at
another height use :func:`scaled_kernel_size`, which scales the kernel by
``height / reference_height`` and rounds to the nearest odd integer (at least 3):
512 px -> 35, 256 px -> 17, 1024 px -> 71 (70 rounded up to odd, the same 71 taps that
``ksize=70`` uses).

Built priors live in ``priors/<name>.npz`` beside a ``MANIFEST.yaml`` (name, file, shape, classes,
ksize, source, command, sha256, created); :func:`load_prior` checks the sha256 against it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import math
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import yaml
from scipy import ndimage

from .errors import DataError
from .io import atomic_path, write_text_atomic

__all__ = [
    "build_spatial_prior",
    "gaussian_kernel_1d",
    "opencv_sigma",
    "scaled_kernel_size",
    "save_prior",
    "load_prior",
    "verify_manifest",
    "plot_prior",
    "resize_prior",
]

log = logging.getLogger(__name__)

MANIFEST_NAME = "MANIFEST.yaml"
_BUILD_HINT = "build it with `selftrain priors build --dataset <source spec> --out {path}`"
_ENTRY_KEYS = ("name", "file", "shape", "classes", "ksize", "source", "command", "sha256", "created")


# ---------------------------------------------------------------------------------------------
# Building


def opencv_sigma(ksize: int) -> float:
    """Gaussian sigma for a kernel of ``ksize`` taps, by OpenCV's ``getGaussianKernel`` rule."""
    return 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8


def gaussian_kernel_1d(ksize: int) -> np.ndarray:
    """Normalised 1-D Gaussian weights, float64 [2 * (ksize // 2) + 1], sigma = ``opencv_sigma(ksize)``."""
    if int(ksize) != ksize or ksize < 1:
        raise ValueError(f"ksize must be a positive integer, got {ksize!r}")
    radius = int(ksize) // 2
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (x / opencv_sigma(int(ksize))) ** 2)
    return weights / weights.sum()


def scaled_kernel_size(height: int, *, ksize: int = 70, reference_height: int = 1024) -> int:
    """Kernel size for a prior ``height`` px high: ``ksize * height / reference_height``,
    rounded to the nearest odd integer (ties upwards), at least 3."""
    if height <= 0 or reference_height <= 0 or ksize <= 0:
        raise ValueError(
            f"height, ksize and reference_height must be positive, got "
            f"height={height}, ksize={ksize}, reference_height={reference_height}"
        )
    scaled = ksize * height / reference_height
    odd = 2 * math.floor((scaled - 1) / 2 + 0.5) + 1
    return max(3, odd)


def build_spatial_prior(
    label_maps: Iterable[Any],
    num_classes: int,
    ksize: int = 70,
    *,
    size: tuple[int, int] | None = None,
    ignore_index: int = 255,
) -> np.ndarray:
    """Class-wise spatial prior from source label maps (CBST §4.4).

    Args:
        label_maps: iterable of integer label maps [H_i, W_i] (numpy arrays or tensors); consumed
            once, one map at a time, so a generator over a whole data set is fine.
        num_classes: C; labels must lie in [0, C) apart from ``ignore_index``.
        ksize: Gaussian kernel size in pixels of the prior (see the module docstring).
        size: (H, W) of the prior; default: the first map's size. Other sizes are resized with
            nearest neighbour.
        ignore_index: label value that does not vote.

    Returns:
        float32 [C, H, W]; every class map sums to 1 (a class never seen is uniform).

    Raises:
        DataError: no maps, a map that is not 2-D integer, or a label outside [0, C).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    kernel = gaussian_kernel_1d(ksize)
    counts, valid = _count_labels(label_maps, num_classes, size, ignore_index)
    voters = np.maximum(valid, 1).astype(np.float64)
    prior = np.empty(counts.shape, dtype=np.float32)
    for c in range(num_classes):  # one class at a time: float64 temporaries stay [H, W]
        prior[c] = _smooth_and_normalise(counts[c] / voters, kernel)
    return prior


def _count_labels(
    label_maps: Iterable[Any], num_classes: int, size: tuple[int, int] | None, ignore_index: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stream the maps into per-pixel counters: counts int32 [C, H, W], valid int32 [H, W]."""
    counts: np.ndarray | None = None
    valid: np.ndarray | None = None
    for index, raw in enumerate(label_maps):
        labels = _as_label_array(raw, index)
        if counts is None:
            height, width = size if size is not None else labels.shape
            counts = np.zeros((num_classes, height, width), dtype=np.int32)
            valid = np.zeros((height, width), dtype=np.int32)
        _check_label_range(labels, num_classes, ignore_index, index)
        labels = _resize_nearest(labels, counts.shape[1:])
        _accumulate(counts, valid, labels, ignore_index)
    if counts is None or valid is None:
        raise DataError("no label maps were given to build the spatial prior; check the source data set path")
    log.debug("spatial prior: counted %s maps of size %s", index + 1, counts.shape[1:])
    return counts, valid


def _as_label_array(raw: Any, index: int) -> np.ndarray:
    """One label map as a 2-D integer numpy array [H, W]."""
    labels = raw.detach().cpu().numpy() if isinstance(raw, torch.Tensor) else np.asarray(raw)
    if labels.ndim != 2:
        raise DataError(f"label map #{index} has shape {labels.shape}; give 2-D [H, W] maps of class ids")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise DataError(f"label map #{index} has dtype {labels.dtype}; give integer class ids, not {labels.dtype}")
    return labels


def _resize_nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize at pixel centres: [h, w] -> [H, W] (no blending of labels)."""
    height, width = size
    if labels.shape == (height, width):
        return labels
    rows = np.minimum(((np.arange(height) + 0.5) * labels.shape[0] / height).astype(np.int64), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * labels.shape[1] / width).astype(np.int64), labels.shape[1] - 1)
    return labels[rows[:, None], cols[None, :]]


def _check_label_range(labels: np.ndarray, num_classes: int, ignore_index: int, index: int) -> None:
    bad = labels[(labels != ignore_index) & ((labels < 0) | (labels >= num_classes))]
    if bad.size:
        value = int(bad.max()) if int(bad.max()) >= num_classes else int(bad.min())
        raise DataError(
            f"label value {value} in label map #{index} is outside [0, {num_classes}) for num_classes={num_classes}; "
            f"map raw ids to train ids (unlabelled -> {ignore_index}) or pass the right num_classes"
        )


def _accumulate(counts: np.ndarray, valid: np.ndarray, labels: np.ndarray, ignore_index: int) -> None:
    """Add one map's votes. Each pixel votes once, so the flat indices are unique and ``+=`` is exact."""
    mask = labels != ignore_index
    pixels = np.flatnonzero(mask)
    flat_index = labels.reshape(-1)[pixels].astype(np.int64) * valid.size + pixels
    counts.reshape(-1)[flat_index] += 1
    valid += mask


def _smooth_and_normalise(freq: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable Gaussian smoothing ('reflect' border) then division by the sum: [H, W] -> [H, W]."""
    if not freq.any():
        return np.full(freq.shape, 1.0 / freq.size, dtype=np.float32)
    smooth = ndimage.correlate1d(freq, kernel, axis=0, mode="reflect")
    smooth = ndimage.correlate1d(smooth, kernel, axis=1, mode="reflect")
    return (smooth / smooth.sum()).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Files: .npz + MANIFEST.yaml


def save_prior(
    path: str | Path,
    prior: np.ndarray | torch.Tensor,
    *,
    class_names: Sequence[str],
    source: str,
    command: str,
    ksize: int,
) -> dict[str, Any]:
    """Write ``prior`` [C, H, W] to ``path`` (.npz, atomically) and record it in the folder's
    MANIFEST.yaml under the file's stem (other entries are kept). Returns the manifest entry."""
    path = Path(path)
    array = _as_prior_array(prior)
    if len(class_names) != array.shape[0]:
        raise ValueError(f"prior has {array.shape[0]} classes but {len(class_names)} class_names were given")
    manifest = _read_manifest(path.parent)  # a damaged manifest stops the save before anything is written
    with atomic_path(path, suffix=".npz.tmp") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, prior=array, class_names=np.asarray(list(class_names), dtype=str), ksize=np.int64(ksize))
    entry = {
        "name": path.stem,
        "file": path.name,
        "shape": [int(s) for s in array.shape],
        "classes": [str(n) for n in class_names],
        "ksize": int(ksize),
        "source": str(source),
        "command": str(command),
        "sha256": _sha256(path),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    manifest[path.stem] = entry
    write_text_atomic(path.parent / MANIFEST_NAME, yaml.safe_dump(manifest, sort_keys=True, allow_unicode=True))
    log.info("saved spatial prior %s %s (sha256 %s)", path, tuple(array.shape), entry["sha256"][:12])
    return entry


def load_prior(path: str | Path, *, num_classes: int | None = None) -> np.ndarray:
    """Read a prior saved by :func:`save_prior`: float32 [C, H, W].

    Raises:
        DataError: the file is missing or unreadable, its sha256 disagrees with MANIFEST.yaml
            beside it, or it has a class count other than ``num_classes``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"spatial prior {path} does not exist; " + _BUILD_HINT.format(path=path))
    _check_against_manifest(path)
    prior = _read_npz_prior(path)
    if num_classes is not None and prior.shape[0] != num_classes:
        raise DataError(
            f"spatial prior {path} has {prior.shape[0]} classes but the model has {num_classes}; "
            + _BUILD_HINT.format(path=path) + f" for the {num_classes}-class label set"
        )
    return prior


def verify_manifest(folder: str | Path) -> list[str]:
    """Check every MANIFEST.yaml entry in ``folder`` against its file. Returns the problems found
    (one readable line each); an empty list means the folder is consistent."""
    folder = Path(folder)
    if not (folder / MANIFEST_NAME).is_file():
        return [f"{folder / MANIFEST_NAME} is missing; rebuild the priors with `selftrain priors build`"]
    try:
        manifest = _read_manifest(folder)
    except DataError as exc:
        return [str(exc)]
    problems = [p for key, entry in sorted(manifest.items()) for p in _entry_problems(folder, key, entry)]
    listed = {entry.get("file") for entry in manifest.values() if isinstance(entry, dict)}
    problems += [
        f"{npz} has no entry in {MANIFEST_NAME}; save it with save_prior / `selftrain priors build`"
        for npz in sorted(folder.glob("*.npz"))
        if npz.name not in listed
    ]
    return problems


def _entry_problems(folder: Path, key: str, entry: Any) -> list[str]:
    """Problems with one manifest entry (missing keys, missing file, sha256, shape, classes)."""
    if not isinstance(entry, dict):
        return [f"{MANIFEST_NAME} entry {key!r} is not a mapping"]
    missing = [k for k in _ENTRY_KEYS if k not in entry]
    if missing:
        return [f"{MANIFEST_NAME} entry {key!r} lacks {', '.join(missing)}"]
    path = folder / str(entry["file"])
    if entry["name"] != key:
        return [f"{MANIFEST_NAME} entry {key!r} names itself {entry['name']!r}"]
    if not path.is_file():
        return [f"{path} is listed in {MANIFEST_NAME} but missing; " + _BUILD_HINT.format(path=path)]
    if _sha256(path) != entry["sha256"]:
        return [f"{path} sha256 differs from {MANIFEST_NAME}; the file changed after it was built: rebuild it"]
    try:
        prior = _read_npz_prior(path)
    except DataError as exc:
        return [str(exc)]
    problems = []
    if list(prior.shape) != list(entry["shape"]):
        problems.append(f"{path} has shape {list(prior.shape)} but {MANIFEST_NAME} says {entry['shape']}")
    if len(entry["classes"]) != prior.shape[0]:
        problems.append(f"{path} has {prior.shape[0]} classes but {MANIFEST_NAME} lists {len(entry['classes'])}")
    return problems


def _check_against_manifest(path: Path) -> None:
    manifest_path = path.parent / MANIFEST_NAME
    if not manifest_path.is_file():
        return
    entry = _read_manifest(path.parent).get(path.stem)
    if not isinstance(entry, dict) or "sha256" not in entry:
        log.warning("spatial prior %s has no entry in %s; its integrity is not checked", path, manifest_path)
        return
    if _sha256(path) != entry["sha256"]:
        raise DataError(
            f"spatial prior {path} does not match its sha256 in {manifest_path} (the file changed after it was "
            f"built); restore it or " + _BUILD_HINT.format(path=path)
        )


def manifest_entry(path: str | Path) -> dict[str, Any] | None:
    """The MANIFEST.yaml entry of a prior file (None when it has none or the entry is not a mapping)."""
    path = Path(path)
    entry = _read_manifest(path.parent).get(path.stem)
    return entry if isinstance(entry, dict) else None


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, OSError, ValueError) as exc:
        raise DataError(
            f"{path} is not valid YAML ({exc.__class__.__name__}); fix or delete it and rebuild the priors"
        ) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DataError(f"{path} must be a mapping of prior name -> entry; fix or delete it and rebuild the priors")
    return data


_MAGIC = {b"\x93NUMPY": "a single .npy array", b"\x89HDF\r\n\x1a\n": "an HDF5 file"}
_NPZ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error)


def _read_npz_prior(path: Path) -> np.ndarray:
    """The ``prior`` array of an .npz file, checked: [C, H, W] real numbers, finite, non-negative,
    no class map all zero. -> float32 [C, H, W]"""
    fix = _BUILD_HINT.format(path=path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise DataError(f"spatial prior {path} cannot be read ({exc.__class__.__name__}); {fix}") from None
    if not head:
        raise DataError(f"spatial prior {path} is empty (0 bytes); {fix}")
    if not head.startswith(b"PK"):
        kind = next((f"is {what}, not" for magic, what in _MAGIC.items() if head.startswith(magic[: len(head)])),
                    "is not")
        raise DataError(f"spatial prior {path} {kind} an .npz archive written by save_prior; {fix}")
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as data:
            if "prior" not in data.files:
                raise DataError(f"spatial prior {path} holds no 'prior' array (it holds {sorted(data.files)}); {fix}")
            raw = data["prior"]
    except _NPZ_ERRORS as exc:
        why = " ".join(str(exc).split())[:160]
        raise DataError(f"spatial prior {path} is unreadable ({exc.__class__.__name__}: {why}); {fix}") from None
    return _checked_prior(path, raw)


def _checked_prior(path: Path, raw: np.ndarray) -> np.ndarray:
    """``raw`` as float32 [C, H, W] when its values can be a prior; a DataError otherwise."""
    fix = _BUILD_HINT.format(path=path)
    if raw.ndim != 3 or 0 in raw.shape:
        raise DataError(f"spatial prior {path} has shape {tuple(raw.shape)}, expected [C, H, W] with C, H, W >= 1; "
                        + fix)
    if raw.dtype.kind not in "iuf":
        raise DataError(f"spatial prior {path} holds {raw.dtype} values, expected real numbers; {fix}")
    prior = raw.astype(np.float32)
    if not np.isfinite(prior).all():
        raise DataError(f"spatial prior {path} holds NaN or infinite values; {fix}")
    if (prior < 0).any():
        raise DataError(f"spatial prior {path} holds negative values (min {float(prior.min()):g}); {fix}")
    empty = np.flatnonzero(prior.reshape(prior.shape[0], -1).sum(1) <= 0)
    if empty.size:
        raise DataError(f"spatial prior {path} has an all-zero map for class {int(empty[0])}; {fix}")
    return prior


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc.__class__.__name__}: {exc.strerror}); check its permissions") \
            from None
    return digest.hexdigest()


def _as_prior_array(prior: np.ndarray | torch.Tensor) -> np.ndarray:
    array = prior.detach().cpu().numpy() if isinstance(prior, torch.Tensor) else np.asarray(prior)
    if array.ndim != 3:
        raise ValueError(f"prior must be [C, H, W], got shape {array.shape}")
    return array.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Use and display


def resize_prior(prior: np.ndarray | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize [C, h, w] -> [C, H, W], floored at 1e-12 and renormalised so each class sums
    to 1 (so ``log q`` stays finite). Keeps a tensor's device; float32 unless given float64."""
    tensor = torch.as_tensor(prior)
    if tensor.ndim != 3:
        raise ValueError(f"prior must be [C, H, W], got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point() or tensor.dtype in (torch.float16, torch.bfloat16):
        tensor = tensor.float()
    size = (int(size[0]), int(size[1]))
    if tuple(tensor.shape[1:]) != size:
        tensor = torch.nn.functional.interpolate(tensor[None], size=size, mode="bilinear", align_corners=False)[0]
    tensor = tensor.clamp_min(1e-12)
    return tensor / tensor.sum(dim=(1, 2), keepdim=True)


def plot_prior(prior: np.ndarray | torch.Tensor, class_names: Sequence[str], out_png: str | Path) -> Path:
    """One viridis heat map per class in a grid (like CBST Fig. 2), each with its own colour scale
    and the class name as title; written atomically to ``out_png``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    array = _as_prior_array(prior)
    if len(class_names) != array.shape[0]:
        raise ValueError(f"prior has {array.shape[0]} classes but {len(class_names)} class_names were given")
    ncols = math.ceil(math.sqrt(array.shape[0]))
    nrows = math.ceil(array.shape[0] / ncols)
    aspect = array.shape[1] / array.shape[2]
    fig = Figure(figsize=(3.0 * ncols, 3.0 * aspect * nrows + 0.4 * nrows))
    FigureCanvasAgg(fig)
    for c, name in enumerate(class_names):
        ax = fig.add_subplot(nrows, ncols, c + 1)
        ax.imshow(array[c], cmap="viridis", interpolation="nearest")
        ax.set_title(str(name), fontsize=9)
        ax.set_axis_off()
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png, suffix=".png.tmp") as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    return out_png
