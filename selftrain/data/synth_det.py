"""Procedurally generated object images: an embedded "VOC -> Clipart"-like detection benchmark.

Both domains share one scene generator: 2-6 objects of six classes, each a silhouette built from
primitives, longer side log-uniform from 10 px to 0.6 of the shorter image side, placed so that
later objects may occlude earlier ones but leave each at least half visible. Only the rendering
differs, as between Pascal VOC and Clipart1k (Inoue et al., CVPR 2018, arXiv:1803.11365): the
source is photo-like (shaded, grainy objects with drop shadows on cluttered backgrounds of smooth
colour noise and textured distractor blobs); the target is clipart-like (flat fills from another
palette, dark outlines around every part, plain backgrounds with a few flat outlined distractors).
Silhouettes are shared and appearance is not, so a source detector transfers through shape only.

Ground truth is one box per object, the tight box of its *visible* pixels (VOC's convention), in
continuous xyxy pixel coordinates: pixels x0..x1, y0..y1 give [x0, y0, x1 + 1, y1 + 1]. No object
is marked difficult. Rendering is deterministic in (split, index, seed, height, width).

:func:`render_fog` is the "Cityscapes -> Foggy Cityscapes"-like variant: photo-like images in both
domains, the target in synthetic fog by Koschmieder's law (Sakaridis et al., IJCV 2018,
arXiv:1708.07819), optionally over the source's own scenes.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from scipy import ndimage

from selftrain.io import atomic_path, write_text_atomic

logger = logging.getLogger(__name__)

CLASS_NAMES = ("car", "person", "bicycle", "bird", "bottle", "dog")  # all Pascal VOC classes
NUM_CLASSES = len(CLASS_NAMES)
SPLITS = ("source", "target_train", "target_val")
_SPLIT_CODES = {"source": 0, "target_train": 1, "target_val": 2}  # explicit: reordering SPLITS changes nothing
MIN_SIZE = 32  # image side
MIN_OBJECT = 10  # px, longer side of the smallest object
MAX_OBJECT = 0.6  # longer side of the largest object, as a fraction of the shorter image side
MIN_VISIBLE = 0.5  # share of an object's pixels that later objects must leave visible
ASPECTS = (2.1, 0.42, 1.65, 1.3, 0.36, 1.45)  # box width / height per class
M, D, L, X = 1, 2, 3, 4  # parts of a silhouette, coloured separately: main, dark, light, detail


@dataclass(frozen=True)
class DetImage:
    """One rendered image and its ground truth."""

    image: np.ndarray  # uint8 [H, W, 3]
    boxes: np.ndarray  # float32 [M, 4] xyxy, continuous pixel coordinates
    labels: np.ndarray  # int64 [M] in 1..K
    instances: np.ndarray  # int16 [H, W]: 0 background, m + 1 on the visible pixels of object m


# --------------------------------------------------------------------------- silhouettes
class _Parts:
    """Part map uint8 [h, w] (0 outside) painted with primitives in box-relative coordinates."""

    def __init__(self, h: int, w: int) -> None:
        self.h, self.w = h, w
        self.map = np.zeros((h, w), np.uint8)

    def _window(self, x0: float, y0: float, x1: float, y1: float):
        """Slices of the pixel extent [x0, x1] x [y0, y1] and its pixel centres x [1, n], y [m, 1]."""
        c0, c1 = max(int(np.floor(x0)), 0), min(int(np.ceil(x1)), self.w)
        r0, r1 = max(int(np.floor(y0)), 0), min(int(np.ceil(y1)), self.h)
        x = np.arange(c0, c1, dtype=np.float32)[None, :] + 0.5
        return (slice(r0, r1), slice(c0, c1)), x, np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5

    def ellipse(self, part: int, cx: float, cy: float, rx: float, ry: float, ring: float = 0.0) -> None:
        """Filled ellipse; ``ring`` > 0 keeps a band that thick (fraction of the height, >= 1 px)."""
        cx, cy, rx, ry = cx * self.w, cy * self.h, max(rx * self.w, 0.7), max(ry * self.h, 0.7)
        win, x, y = self._window(cx - rx, cy - ry, cx + rx, cy + ry)
        mask = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0
        band = max(ring * self.h, 1.0)
        if ring > 0 and min(rx, ry) > band:
            mask &= ((x - cx) / (rx - band)) ** 2 + ((y - cy) / (ry - band)) ** 2 > 1.0
        self.map[win][mask] = part

    def rect(self, part: int, x0: float, y0: float, x1: float, y1: float) -> None:
        """Axis-aligned rectangle, at least one pixel wide and high."""
        (x0, x1), (y0, y1) = (_widen(a * n, b * n) for a, b, n in ((x0, x1, self.w), (y0, y1, self.h)))
        self.map[self._window(x0, y0, x1, y1)[0]] = part

    def line(self, part: int, thick: float, a: tuple[float, float], b: tuple[float, float]) -> None:
        """Thick segment a -> b; ``thick`` is a fraction of the shorter box side (>= 1.4 px)."""
        (ax, ay), (bx, by) = (a[0] * self.w, a[1] * self.h), (b[0] * self.w, b[1] * self.h)
        half = max(thick * min(self.h, self.w), 1.4) / 2.0
        win, x, y = self._window(min(ax, bx) - half, min(ay, by) - half, max(ax, bx) + half, max(ay, by) + half)
        dx, dy, px, py = bx - ax, by - ay, x - ax, y - ay
        t = np.clip((px * dx + py * dy) / max(dx * dx + dy * dy, 1e-6), 0.0, 1.0)
        self.map[win][(px - t * dx) ** 2 + (py - t * dy) ** 2 <= half * half] = part

    def poly(self, part: int, *points: tuple[float, float]) -> None:
        """Convex polygon, vertices in either orientation."""
        pts = [(u * self.w, v * self.h) for u, v in points]
        xs, ys = [q[0] for q in pts], [q[1] for q in pts]
        win, x, y = self._window(min(xs), min(ys), max(xs), max(ys))
        (ax, ay), (bx, by), (cx, cy) = pts[:3]
        sign = 1.0 if (bx - ax) * (cy - by) - (by - ay) * (cx - bx) >= 0 else -1.0
        mask = np.ones((y.shape[0], x.shape[1]), bool)
        for (px, py), (qx, qy) in zip(pts, pts[1:] + pts[:1]):
            mask &= sign * ((qx - px) * (y - py) - (qy - py) * (x - px)) >= 0
        self.map[win][mask] = part


def _widen(a: float, b: float) -> tuple[float, float]:
    mid = 0.5 * (a + b)
    return (a, b) if b - a >= 1.0 else (mid - 0.5, mid + 0.5)


# Silhouettes facing right in box-relative coordinates (u right, v down), painted in order:
# ("ellipse", part, cx, cy, rx, ry[, ring]), ("rect", part, x0, y0, x1, y1),
# ("line", part, thickness, a, b), ("poly", part, *convex vertices).
SHAPES = (
    (  # car, side view: body, cabin, two windows, headlight, wheels with hubs
        ("rect", M, 0.02, 0.4, 0.98, 0.8), ("poly", M, (0.2, 0.42), (0.32, 0.05), (0.66, 0.05), (0.82, 0.42)),
        ("poly", L, (0.27, 0.4), (0.36, 0.13), (0.48, 0.13), (0.48, 0.4)),
        ("poly", L, (0.52, 0.4), (0.52, 0.13), (0.63, 0.13), (0.74, 0.4)), ("rect", X, 0.92, 0.45, 0.98, 0.56),
        ("ellipse", D, 0.2, 0.78, 0.105, 0.22), ("ellipse", L, 0.2, 0.78, 0.04, 0.08),
        ("ellipse", D, 0.8, 0.78, 0.105, 0.22), ("ellipse", L, 0.8, 0.78, 0.04, 0.08)),
    (  # person, front view: legs, trapezoid torso, arms, head
        ("line", D, 0.2, (0.42, 0.55), (0.34, 0.98)), ("line", D, 0.2, (0.58, 0.55), (0.66, 0.98)),
        ("poly", M, (0.2, 0.2), (0.8, 0.2), (0.7, 0.58), (0.3, 0.58)),
        ("line", M, 0.15, (0.24, 0.23), (0.07, 0.56)), ("line", M, 0.15, (0.76, 0.23), (0.93, 0.56)),
        ("ellipse", L, 0.5, 0.1, 0.2, 0.09)),
    (  # bicycle, side view: two rings, a diamond frame (rear hub, crank, seat, head), saddle, handlebar
        ("ellipse", D, 0.22, 0.7, 0.2, 0.3, 0.07), ("ellipse", D, 0.78, 0.7, 0.2, 0.3, 0.07),
        ("line", M, 0.07, (0.22, 0.7), (0.47, 0.72)), ("line", M, 0.07, (0.47, 0.72), (0.4, 0.32)),
        ("line", M, 0.07, (0.22, 0.7), (0.4, 0.32)), ("line", M, 0.07, (0.4, 0.32), (0.72, 0.3)),
        ("line", M, 0.07, (0.47, 0.72), (0.72, 0.3)), ("line", M, 0.07, (0.72, 0.3), (0.78, 0.7)),
        ("line", M, 0.07, (0.4, 0.32), (0.38, 0.16)), ("line", D, 0.09, (0.28, 0.14), (0.46, 0.14)),
        ("line", M, 0.07, (0.72, 0.3), (0.7, 0.1)), ("line", D, 0.08, (0.7, 0.1), (0.84, 0.08))),
    (  # bird, perched: legs, tail, body, belly, wing, head, beak
        ("line", X, 0.06, (0.44, 0.72), (0.41, 0.99)), ("line", X, 0.06, (0.54, 0.72), (0.57, 0.99)),
        ("poly", D, (0.22, 0.48), (0.0, 0.34), (0.02, 0.66), (0.25, 0.62)), ("ellipse", M, 0.46, 0.55, 0.3, 0.22),
        ("ellipse", L, 0.52, 0.64, 0.2, 0.1), ("ellipse", D, 0.4, 0.5, 0.2, 0.12),
        ("ellipse", M, 0.75, 0.3, 0.14, 0.16), ("poly", X, (0.86, 0.25), (1.0, 0.33), (0.86, 0.38))),
    (  # bottle, upright: body, rounded shoulder, neck, cap, label band
        ("rect", M, 0.05, 0.4, 0.95, 1.0), ("ellipse", M, 0.5, 0.42, 0.45, 0.14), ("rect", M, 0.32, 0.08, 0.68, 0.4),
        ("rect", D, 0.28, 0.0, 0.72, 0.09), ("rect", L, 0.05, 0.56, 0.95, 0.8)),
    (  # dog, standing: four legs, tail, body, neck, head, snout, nose, ear
        ("line", M, 0.1, (0.22, 0.5), (0.2, 0.98)), ("line", M, 0.1, (0.33, 0.5), (0.34, 0.98)),
        ("line", M, 0.1, (0.6, 0.5), (0.58, 0.98)), ("line", M, 0.1, (0.7, 0.5), (0.72, 0.98)),
        ("line", M, 0.07, (0.15, 0.38), (0.03, 0.12)), ("ellipse", M, 0.45, 0.45, 0.33, 0.2),
        ("line", M, 0.16, (0.68, 0.4), (0.8, 0.24)), ("ellipse", M, 0.8, 0.22, 0.11, 0.15),
        ("ellipse", M, 0.92, 0.3, 0.08, 0.07), ("ellipse", D, 0.98, 0.27, 0.025, 0.035),
        ("poly", D, (0.73, 0.12), (0.78, 0.03), (0.82, 0.1), (0.78, 0.36))),
)
BLOBS = ((("ellipse", M, 0.5, 0.5, 0.5, 0.5),), (("rect", M, 0.0, 0.0, 1.0, 1.0),),
         (("poly", M, (0.5, 0.0), (1.0, 1.0), (0.0, 1.0)),))  # distractors: disc, box, triangle


@functools.lru_cache(maxsize=4096)
def draw(shape: tuple, height: int, width: int) -> np.ndarray:
    """Part map uint8 [height, width] of a shape from ``SHAPES`` or ``BLOBS``; read-only, cached
    because box sizes repeat across images."""
    parts = _Parts(height, width)
    for kind, part, *args in shape:
        getattr(parts, kind)(part, *args)
    parts.map.setflags(write=False)
    return parts.map


# --------------------------------------------------------------------------- scene
@dataclass(frozen=True)
class _Obj:
    cls: int  # 0-based
    y: int
    x: int
    parts: np.ndarray  # uint8 [h, w]


def _sample_parts(cls: int, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    longer = np.exp(rng.uniform(np.log(MIN_OBJECT), np.log(MAX_OBJECT * min(height, width))))
    aspect = ASPECTS[cls] * np.exp(rng.uniform(-0.12, 0.12))
    w, h = (longer, longer / aspect) if aspect >= 1 else (longer * aspect, longer)
    parts = draw(SHAPES[cls], max(round(h), 3), max(round(w), 3))
    return parts[:, ::-1] if rng.random() < 0.5 else parts


def _sample_scene(rng: np.random.Generator, height: int, width: int) -> tuple[list[_Obj], np.ndarray]:
    """Objects in painting order and the instance map int16 [H, W] of their visible pixels. A position
    that would leave an earlier object less than ``MIN_VISIBLE`` of its pixels is redrawn (10 tries)."""
    inst = np.zeros((height, width), np.int16)
    objs, full = [], np.zeros(1, np.int64)  # pixels per instance id before occlusion (0 unused)
    for _ in range(int(rng.integers(2, 7))):
        cls = int(rng.integers(NUM_CLASSES))
        parts = _sample_parts(cls, rng, height, width)
        (h, w), mask = parts.shape, parts > 0
        for _attempt in range(10 if mask.any() else 0):
            y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            win = inst[y:y + h, x:x + w]
            left = np.bincount(inst.ravel(), minlength=len(full)) - np.bincount(win[mask], minlength=len(full))
            if np.all(left[1:] >= MIN_VISIBLE * full[1:]):
                win[mask] = len(full)
                full = np.append(full, mask.sum())
                objs.append(_Obj(cls, y, x, parts))
                break
    return objs, inst


def _boxes(inst: np.ndarray) -> np.ndarray:
    """Tight boxes [M, 4] (continuous xyxy) of the visible pixels of instances 1..M."""
    slices = ndimage.find_objects(inst)
    return np.array([(sx.start, sy.start, sx.stop, sy.stop) for sy, sx in slices], np.float32).reshape(-1, 4)


# --------------------------------------------------------------------------- appearance
_PHOTO = (  # per class: (main choices, dark, light, detail); an instance picks and jitters them
    ([(165, 30, 30), (30, 60, 145), (180, 180, 185), (28, 28, 32), (225, 225, 220), (40, 105, 60)],
     (30, 30, 32), (115, 145, 170), (235, 220, 160)),
    ([(150, 40, 40), (40, 70, 130), (90, 110, 60), (200, 190, 170), (60, 60, 65)],
     (50, 55, 85), (215, 170, 140), (0, 0, 0)),
    ([(170, 30, 30), (20, 90, 160), (30, 30, 30), (190, 190, 190), (200, 170, 30)], (28, 28, 28), (0, 0, 0), (0, 0, 0)),
    ([(120, 95, 70), (140, 138, 130), (90, 70, 50), (70, 80, 95)], (60, 48, 38), (205, 195, 175), (215, 160, 50)),
    ([(40, 105, 55), (105, 60, 25), (165, 185, 180), (40, 70, 110)], (45, 45, 45), (225, 220, 205), (0, 0, 0)),
    ([(150, 108, 68), (48, 42, 38), (215, 205, 185), (185, 145, 90)], (72, 50, 36), (0, 0, 0), (30, 25, 25)),
)
_BOLD = np.array([(228, 38, 50), (36, 118, 230), (250, 200, 28), (56, 178, 72), (246, 128, 40),
                  (146, 36, 182), (66, 208, 228), (238, 56, 206)], np.float32)
_PASTEL = np.array([(250, 246, 232), (206, 232, 250), (222, 245, 206), (255, 228, 236), (255, 255, 255),
                    (236, 228, 255), (255, 240, 202)], np.float32)
_INK = np.array((32, 30, 40), np.float32)


def _photo_colours(cls: int, rng: np.random.Generator) -> np.ndarray:
    """[5, 3] float32 colour per part id (row 0 unused) for one source instance."""
    mains, dark, light, detail = _PHOTO[cls]
    table = np.array([(0, 0, 0), mains[rng.integers(len(mains))], dark, light, detail], np.float32)
    return table + rng.normal(0.0, 12.0, (5, 3)).astype(np.float32)


def _flat_colours(rng: np.random.Generator) -> np.ndarray:
    """[5, 3] float32 colour per part id for one target instance: each part its own bold colour (dark
    parts darkened, light parts paled), so no class keeps the part colours it has in the source."""
    scale, offset = np.array([1.0, 1.0, 0.45, 0.4, 1.0], np.float32), np.array([0, 0, 0, 153, 0], np.float32)
    return _BOLD[rng.integers(len(_BOLD), size=5)] * scale[:, None] + offset[:, None]


@functools.lru_cache(maxsize=16)
def _interp(n: int, k: int) -> np.ndarray:
    """Linear interpolation matrix [n, k] from k control points spread over n pixels."""
    pos = (np.arange(n) + 0.5) / n * (k - 1)
    return np.maximum(0.0, 1.0 - np.abs(pos[:, None] - np.arange(k)[None, :])).astype(np.float32)


def _smooth(coarse: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling of coarse float32 [a, b, 3] to [H, W, 3]."""
    a, b, _ = coarse.shape
    rows = (_interp(height, a) @ coarse.reshape(a, b * 3)).reshape(height, b, 3)  # [H, b, 3]
    return _interp(width, b) @ rows  # [W, b] @ [H, b, 3] -> [H, W, 3]


def _shaded(parts: np.ndarray, colours: np.ndarray, grain: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Colours [h, w, 3] of a source object: part colours x soft light from above x grain."""
    h, w = parts.shape
    dx = (np.arange(w, dtype=np.float32) + 0.5) / w - np.float32(rng.uniform(0.2, 0.8))
    dy = (np.arange(h, dtype=np.float32) + 0.5) / h - np.float32(rng.uniform(0.1, 0.4))
    light = np.clip((1.28 - 0.9 * dy * dy)[:, None] - (0.9 * dx * dx)[None, :], 0.45, 1.3)
    light *= 1.0 + 0.25 * grain[:h, :w]
    return colours[parts] * light[..., None]


def _paint(img: np.ndarray, y: int, x: int, parts: np.ndarray, colours: np.ndarray) -> None:
    """Write ``colours`` [h, w, 3] into ``img`` where ``parts`` > 0."""
    win = img[y:y + parts.shape[0], x:x + parts.shape[1]]
    np.copyto(win, colours, where=(parts > 0)[..., None])


def _random_blob(rng: np.random.Generator, height: int, width: int, largest: float) -> tuple[int, int, np.ndarray]:
    """A distractor disc, box or triangle (part map of M) 5 to ``largest`` px wide, and where it goes."""
    h, w = (max(int(v), 3) for v in rng.uniform(5, largest, 2))
    return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), draw(BLOBS[rng.integers(3)], h, w)


def _render_photo(objs: list[_Obj], rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Source style, float32 [H, W, 3]: cluttered smooth background, blobs, shaded objects, shadows."""
    coarse = 0.6 * rng.uniform(25, 225, (3, 3, 3)) + 0.4 * rng.uniform(60, 180)
    img = _smooth(coarse.astype(np.float32), height, width)
    img += _smooth(rng.normal(0, 22, (7, 7, 3)).astype(np.float32), height, width)
    grain = rng.random((height, width), dtype=np.float32) - np.float32(0.5)  # uniform, std ~0.29
    for _ in range(int(rng.integers(3, 9))):
        y, x, blob = _random_blob(rng, height, width, 0.35 * min(height, width))
        colours = np.tile(rng.uniform(30, 220, 3).astype(np.float32), (5, 1))
        _paint(img, y, x, blob, _shaded(blob, colours, grain[y:, x:], rng))
    for o in objs:
        d = max(1, round(0.06 * max(o.parts.shape)))
        shadow = img[o.y + d:o.y + d + o.parts.shape[0], o.x + d:o.x + d + o.parts.shape[1]]
        shadow[o.parts[:shadow.shape[0], :shadow.shape[1]] > 0] *= 0.6
        _paint(img, o.y, o.x, o.parts, _shaded(o.parts, _photo_colours(o.cls, rng), grain[o.y:, o.x:], rng))
    return img + 14.0 * grain[::-1, ::-1, None]  # sensor noise (luminance), decorrelated from the texture


def _flat_object(parts: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Colours [h, w, 3] of a target object: flat part fills, ink on the silhouette's edge and along
    part borders (one pixel, 4-neighbourhood; borders on the side of the lower part id)."""
    p = np.pad(parts, 1)
    c, near = p[1:-1, 1:-1], (p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:])
    out = colours[parts].copy()
    out[(c > 0) & np.logical_or.reduce([(n == 0) | (n > c) for n in near])] = _INK
    return out


def _render_flat(objs: list[_Obj], rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Target style, float [H, W, 3]: plain background, optional ground band, flat outlined objects."""
    img = np.tile(_PASTEL[rng.integers(len(_PASTEL))], (height, width, 1))
    if rng.random() < 0.6:
        ground = int(rng.uniform(0.55, 0.85) * height)
        img[ground:] = _PASTEL[rng.integers(len(_PASTEL))] * 0.92
        img[ground] = _INK
    for _ in range(int(rng.integers(2, 7))):
        y, x, blob = _random_blob(rng, height, width, 0.3 * min(height, width))
        colour = _PASTEL[rng.integers(len(_PASTEL))] * rng.uniform(0.75, 0.95)
        _paint(img, y, x, blob, _flat_object(blob, np.tile(colour, (5, 1))))
    for o in objs:
        _paint(img, o.y, o.x, o.parts, _flat_object(o.parts, _flat_colours(rng)))
    return img


# --------------------------------------------------------------------------- public API

def _check(split: str, index: int, seed: int, height: int, width: int) -> int:
    if split not in _SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    for name, size in (("height", height), ("width", width)):
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
            raise ValueError(f"{name} must be an integer >= {MIN_SIZE}, got {size!r}")
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be >= 0, got index={index}, seed={seed}")
    return _SPLIT_CODES[split]


def render(split: str, index: int, *, seed: int = 0, height: int = 128, width: int = 128) -> DetImage:
    """Render image ``index`` of "source" (photo style) or "target_train" / "target_val" (clipart
    style); each split has its own scene stream, every image is independent. Raises ValueError for an
    unknown split, a size below ``MIN_SIZE`` or not an integer, a negative index or seed."""
    code = _check(split, index, seed, height, width)
    # Scene and appearance streams are separate: a style change never moves an object.
    objs, inst = _sample_scene(np.random.default_rng([seed, code, index, 0]), height, width)
    style = _render_photo if split == "source" else _render_flat
    img = style(objs, np.random.default_rng([seed, code, index, 1]), height, width)
    labels = np.array([o.cls + 1 for o in objs], np.int64)
    return DetImage(np.clip(np.rint(img), 0, 255).astype(np.uint8), _boxes(inst), labels, inst)


# --------------------------------------------------------------------------- fog
# Fog density in 1/m. 0.02 (visibility 2.996 / beta = 150 m) is the densest of Foggy Cityscapes'
# three releases (0.005, 0.01, 0.02) and the only one in its val set that DA Faster R-CNN, SWDA,
# SCDA, HTCN and iFAN report, hence the default.
FOG_BETA = 0.02
GROUND_DEPTH = (40.0, 60.0)  # m: the background plane at the bottom and at the top row
OBJECT_DEPTH = (8.0, 38.0)  # m: the nearest and the farthest object
AIRLIGHT = (0.75, 0.9)  # grey atmospheric light A, a fraction of white, drawn per image


def transmission(depth: np.ndarray, beta: float) -> np.ndarray:
    """Koschmieder's transmission t = exp(-beta z) of depth z (m) at fog density beta (1/m)."""
    return np.exp(-np.float32(beta) * depth)


def koschmieder(clear: np.ndarray, t: np.ndarray, airlight: float) -> np.ndarray:
    """Foggy image I = J t + A (1 - t) (Koschmieder 1924; Sakaridis et al., IJCV 2018, Eq. 1).

    Shape: clear J [H, W, 3] and airlight A in the same units, t [H, W] -> [H, W, 3].
    """
    return clear * t[..., None] + np.float32(airlight) * (1.0 - t[..., None])


def fog_depth(inst: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Synthetic depth float32 [H, W] in metres for the instance map ``inst`` [H, W].

    The background is a ground plane seen in perspective: inverse depth linear in the row, from
    ``GROUND_DEPTH[0]`` m at the bottom to ``GROUND_DEPTH[1]`` m at the top. Each object has one depth from
    ``OBJECT_DEPTH``, decreasing in painting order, so an object that occludes another is nearer.
    With beta 0.02 the background keeps t = 0.30-0.45 and the objects 0.47-0.85.
    """
    h, w = inst.shape
    near, far = GROUND_DEPTH
    rows = (np.arange(h, dtype=np.float32) + 0.5) / h
    depth = np.repeat((1.0 / (1.0 / far + (1.0 / near - 1.0 / far) * rows))[:, None], w, 1).astype(np.float32)
    objects = np.sort(rng.uniform(*OBJECT_DEPTH, int(inst.max())))[::-1].astype(np.float32)
    depth[inst > 0] = objects[inst[inst > 0] - 1]
    return depth


def render_fog(split: str, index: int, *, seed: int = 0, height: int = 128, width: int = 128,
               beta: float = FOG_BETA, same_scenes: bool = False) -> DetImage:
    """Image ``index`` of the fog benchmark (Cityscapes -> Foggy Cityscapes in miniature): every split
    photo-like as ``render("source", ...)``; "target_train" / "target_val" then fogged by
    :func:`koschmieder` with :func:`fog_depth` and a grey airlight. No blur or noise is added (Foggy
    Cityscapes adds none), so beta 0 gives the clear image exactly. ``same_scenes``: target_train
    image i is source image i in fog (the same scene, appearance and boxes), as Foggy Cityscapes
    train is Cityscapes train; target_val always has its own scenes. Raises ValueError as
    :func:`render` does, and for a negative beta.
    """
    code = _check(split, index, seed, height, width)
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0 (1/m), got {beta!r}")
    scene = _SPLIT_CODES["source"] if same_scenes and split == "target_train" else code
    objs, inst = _sample_scene(np.random.default_rng([seed, scene, index, 0]), height, width)
    img = np.clip(_render_photo(objs, np.random.default_rng([seed, scene, index, 1]), height, width), 0, 255)
    if split != "source":
        rng = np.random.default_rng([seed, code, index, 2])
        depth = fog_depth(inst, rng)
        img = koschmieder(img, transmission(depth, beta), 255.0 * rng.uniform(*AIRLIGHT))
    labels = np.array([o.cls + 1 for o in objs], np.int64)
    return DetImage(np.rint(img).astype(np.uint8), _boxes(inst), labels, inst)


def voc_xml(filename: str, size: tuple[int, int], boxes: np.ndarray, labels: np.ndarray,
            class_names: tuple[str, ...] = CLASS_NAMES) -> str:
    """A Pascal VOC annotation; ``boxes`` [M, 4] continuous xyxy with integral corners are written
    1-based inclusive (xmin = x0 + 1, xmax = x1), the inverse of the loader's conversion."""
    objects = "".join(
        f"  <object><name>{class_names[int(c) - 1]}</name><difficult>0</difficult><bndbox><xmin>{x0 + 1}</xmin>"
        f"<ymin>{y0 + 1}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>\n"
        for (x0, y0, x1, y1), c in zip(np.rint(boxes).astype(int).tolist(), labels))
    return (f"<annotation>\n  <folder>synth_shapes</folder><filename>{filename}</filename>\n  <size><width>{size[1]}"
            f"</width><height>{size[0]}</height><depth>3</depth></size>\n{objects}</annotation>\n")


def write_det_benchmark(out_dir, *, seed: int = 0, num_source: int = 600, num_target_train: int = 400,
                        num_target_val: int = 200, height: int = 128, width: int = 128,
                        image_format: str = "png") -> Path:
    """Write the three splits in one VOC layout: ``out/JPEGImages/<split>_<index:05d>.<png|jpg>``,
    ``out/Annotations/<id>.xml``, ``out/ImageSets/Main/<split>.txt`` and ``out/benchmark.yaml``.

    Read it back with the ``voc`` detection data set (root = out, split = a split name, class_names =
    ``CLASS_NAMES``, all VOC classes). Every file is written atomically and the yaml last, so its
    presence marks a complete benchmark. JPEG is lossy; PNG (default) keeps the pixels exact.
    """
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    counts = {"source": num_source, "target_train": num_target_train, "target_val": num_target_val}
    _check("source", 0, seed, height, width)
    if min(counts.values()) < 0:
        raise ValueError(f"image counts must be >= 0, got {counts}")
    out = Path(out_dir)
    for split in SPLITS:
        ids = [_write_one(out, split, i, seed, height, width, image_format) for i in range(counts[split])]
        write_text_atomic(out / "ImageSets" / "Main" / f"{split}.txt", "".join(f"{i}\n" for i in ids))
    meta = {"seed": seed, "height": height, "width": width, "counts": counts, "image_format": image_format,
            "num_classes": NUM_CLASSES, "class_names": list(CLASS_NAMES), "splits": list(SPLITS)}
    write_text_atomic(out / "benchmark.yaml", yaml.safe_dump(meta, sort_keys=False))
    logger.info("wrote synthetic detection benchmark (%d images, %dx%d) to %s", sum(counts.values()), height, width, out)
    return out


def _write_one(out: Path, split: str, index: int, seed: int, height: int, width: int, fmt: str) -> str:
    image_id = f"{split}_{index:05d}"
    r = render(split, index, seed=seed, height=height, width=width)
    filename = f"{image_id}.{fmt}"
    with atomic_path(out / "JPEGImages" / filename, suffix=f".{fmt}") as tmp:
        Image.fromarray(r.image).save(tmp, format="PNG" if fmt == "png" else "JPEG", quality=95)
    write_text_atomic(out / "Annotations" / f"{image_id}.xml", voc_xml(filename, (height, width), r.boxes, r.labels))
    return image_id
