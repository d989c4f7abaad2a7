"""Tiny copies of the real data sets, written in each exact official layout (for tests and recipe runs).

Every writer puts a handful of small PNG/JPEG files under ``root`` with realistic label values
(Cityscapes label ids 0..33, SYNTHIA ids 0..22 in a 16-bit PNG, BDD100K train ids with 255) and
returns a :class:`Written`: the ids per split, as the data sets name them, and the raw label
arrays as stored. Import with ``from layouts import write_cityscapes`` (``tests`` is on the path).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

FOG_BETAS = ("0.005", "0.01", "0.02")
# Label ids found in NTHU's *_eval.png files: 0 (unlabelled) and the 13 annotated Cityscapes classes.
NTHU_LABEL_IDS = (0, 7, 8, 11, 19, 20, 21, 23, 24, 25, 26, 28, 32, 33)


@dataclass
class Written:
    """What a writer wrote: ``ids[split]`` in data-set order, ``labels[id]`` the raw label array as stored."""

    root: Path
    ids: dict[str, list[str]] = field(default_factory=dict)
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def _image(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    return rng.integers(0, 256, (*size, 3), dtype=np.uint8)


def _save(array: np.ndarray, path: Path, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


def write_cityscapes(root: str | Path, *, splits: dict[str, int] | None = None, size: tuple[int, int] = (32, 64),
                     foggy: bool = True, seed: int = 0) -> Written:
    """``leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png``, ``gtFine/...{_gtFine_labelIds,_gtFine_color}.png``
    and, with ``foggy``, ``leftImg8bit_foggy/...<stem>_leftImg8bit_foggy_beta_<beta>.png`` for the three betas.

    ``splits``: images per split (default train 3, val 2); labels hold random label ids 0..33.
    Fog of density beta blends the clear image towards grey by 20 * beta (0.1 to 0.4).
    """
    rng, out = np.random.default_rng(seed), Written(Path(root))
    for split, count in (splits or {"train": 3, "val": 2}).items():
        cities = ["aachen", "bochum"] if split == "train" else ["frankfurt", "lindau"]
        out.ids[split] = []
        for i in range(count):
            city = cities[i % len(cities)]
            stem = f"{city}_{i:06d}_000019"
            image, label = _image(rng, size), rng.integers(0, 34, size, dtype=np.uint8)
            _save(image, out.root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            _save(label, out.root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
            _save(image[:, ::-1].copy(), out.root / "gtFine" / split / city / f"{stem}_gtFine_color.png")
            for beta in FOG_BETAS if foggy else ():
                fog = (image * (1 - 20 * float(beta)) + 128 * 20 * float(beta)).astype(np.uint8)
                _save(fog, out.root / "leftImg8bit_foggy" / split / city / f"{stem}_leftImg8bit_foggy_beta_{beta}.png")
            out.ids[split].append(f"{city}/{stem}")
            out.labels[f"{city}/{stem}"] = label
        out.ids[split].sort()
    return out


def write_gta5(root: str | Path, *, n: int = 4, size: tuple[int, int] = (24, 40), mismatched: int = 1,
               seed: int = 0) -> Written:
    """``images/NNNNN.png`` with ``labels/NNNNN.png`` (palette PNGs of Cityscapes label ids 0..33).

    The last ``mismatched`` labels are two rows taller than their image, as a few pairs of the
    public release are; their ids land in ``skipped`` and not in ``ids[""]``.
    """
    rng, out = np.random.default_rng(seed), Written(Path(root), ids={"": []})
    for i in range(1, n + 1):
        stem = f"{i:05d}"
        bad = i > n - mismatched
        label = rng.integers(0, 34, (size[0] + 2 * bad, size[1]), dtype=np.uint8)
        _save(_image(rng, size), out.root / "images" / f"{stem}.png")
        _palette_png(label, out.root / "labels" / f"{stem}.png")
        (out.skipped if bad else out.ids[""]).append(stem)
        out.labels[stem] = label
    return out


def _palette_png(indices: np.ndarray, path: Path) -> None:
    """A mode-P PNG whose palette indices are ``indices`` (GTA5 labels are stored this way)."""
    im = Image.frombytes("P", (indices.shape[1], indices.shape[0]), indices.tobytes())
    im.putpalette([v for c in range(256) for v in (c, (3 * c) % 256, 255 - c)])
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def png16(array: np.ndarray, path: Path) -> None:
    """Write uint16 [H, W, 3] as a 16-bit RGB PNG, channels in file order (R, G, B), big-endian samples.

    Written by hand rather than with OpenCV so that the channel order of the fixture does not
    depend on the BGR convention of the reader under test.
    """
    h, w, _ = array.shape
    rows = array.astype(">u2").reshape(h, w * 3).tobytes()
    stride = w * 3 * 2
    raw = b"".join(b"\x00" + rows[r * stride:(r + 1) * stride] for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def write_synthia(root: str | Path, *, n: int = 3, size: tuple[int, int] = (24, 40), seed: int = 0) -> Written:
    """``RGB/NNNNNNN.png`` with ``GT/LABELS/NNNNNNN.png``: 16-bit RGB PNGs, class id (0..22) in the
    first channel, an instance id (1000 + k, k < 40) in the second, 0 in the third.
    ``labels[id]`` is the class-id channel."""
    rng, out = np.random.default_rng(seed), Written(Path(root), ids={"": []})
    for i in range(n):
        stem = f"{i:07d}"
        classes = rng.integers(0, 23, size).astype(np.uint16)
        gt = np.stack([classes, 1000 + rng.integers(0, 40, size).astype(np.uint16), np.zeros(size, np.uint16)], -1)
        _save(_image(rng, size), out.root / "RGB" / f"{stem}.png")
        png16(gt, out.root / "GT" / "LABELS" / f"{stem}.png")
        out.ids[""].append(stem)
        out.labels[stem] = classes
    return out


def write_nthu(root: str | Path, *, city: str = "Rome", n_train: int = 2, n_test: int = 2,
               size: tuple[int, int] = (24, 40), seed: int = 0) -> Written:
    """``<City>/Images/Train/*.jpg`` (unlabelled), ``<City>/Images/Test/*.png`` with
    ``<City>/Labels/Test/<stem>_eval.png`` holding Cityscapes label ids of the 13 NTHU classes and 0."""
    rng, out = np.random.default_rng(seed), Written(Path(root), ids={"train": [], "test": []})
    base = out.root / city
    for i in range(n_train):
        _save(_image(rng, size), base / "Images" / "Train" / f"pre_{i:04d}.jpg", quality=95)
        out.ids["train"].append(f"pre_{i:04d}")
    for i in range(n_test):
        stem = f"{city.lower()}_{i:04d}"
        label = rng.choice(np.array(NTHU_LABEL_IDS, dtype=np.uint8), size)
        _save(_image(rng, size), base / "Images" / "Test" / f"{stem}.png")
        _save(label, base / "Labels" / "Test" / f"{stem}_eval.png")
        out.ids["test"].append(stem)
        out.labels[stem] = label
    return out


def write_bdd100k(root: str | Path, *, splits: dict[str, int] | None = None, size: tuple[int, int] = (24, 40),
                  legacy: bool = False, seed: int = 0) -> Written:
    """The current release layout ``images/10k/<split>/*.jpg`` with ``labels/sem_seg/masks/<split>/*.png``,
    or with ``legacy`` the older ``seg/images/<split>/*.jpg`` with ``seg/labels/<split>/*_train_id.png``.

    ``splits``: images per split (default train 2, val 2); masks hold train ids 0..18 and 255.
    """
    rng, out = np.random.default_rng(seed), Written(Path(root))
    images, labels, suffix = ("seg/images", "seg/labels", "_train_id.png") if legacy else \
        ("images/10k", "labels/sem_seg/masks", ".png")
    for split, count in (splits or {"train": 2, "val": 2}).items():
        out.ids[split] = []
        for i in range(count):
            stem = f"{rng.integers(0, 2**32):08x}-{i:08x}"
            mask = rng.choice(np.array([*range(19), 255], dtype=np.uint8), size)
            _save(_image(rng, size), out.root / images / split / f"{stem}.jpg", quality=95)
            _save(mask, out.root / labels / split / f"{stem}{suffix}")
            out.ids[split].append(stem)
            out.labels[stem] = mask
        out.ids[split].sort()
    return out
