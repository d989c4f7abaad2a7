"""Procedurally generated street scenes: an embedded "GTA5 -> Cityscapes"-like pair of domains.

Both domains come from one scene generator (layout, objects, sizes, class imbalance); only the
rendering differs. The source style is flat and textured like a game; the target style shifts the
colour and texture of the big classes strongly, the small classes weakly, and adds haze towards the
horizon, illumination change, blur and noise. Used to reproduce class-balanced self-training
(CBST, Zou et al., ECCV 2018, arXiv:1810.07911) on a CPU in minutes.

Design constraints come from a prototype (shared/notes/synthetic_benchmark.md): the big-class shift
must be large (half of it gave no measurable adaptation gain), no target class may take another
class's source colour (the model then mislabels it confidently and CBST degrades every round),
the layout must be regular (sky on top, road at the bottom: the spatial prior's signal), rare
objects must be large enough to learn at 64x128, and the shift strength is the same in every image.

All geometry is in relative coordinates: u = x / width and v = y / height, both in [0, 1], so one
scene gives the same label layout at every resolution (up to pixel rounding).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from scipy import ndimage

from selftrain.io import atomic_path, write_text_atomic

logger = logging.getLogger(__name__)

CLASS_NAMES = ("road", "sidewalk", "building", "vegetation", "sky",
               "car", "pole", "traffic_sign", "person", "bicycle")
NUM_CLASSES = 10
ROAD, SIDEWALK, BUILDING, VEGETATION, SKY, CAR, POLE, SIGN, PERSON, BICYCLE = range(NUM_CLASSES)
LARGE_CLASSES = (ROAD, BUILDING, VEGETATION, SKY)
MEDIUM_CLASSES = (SIDEWALK, CAR)
RARE_CLASSES = (POLE, SIGN, PERSON, BICYCLE)

# Cityscapes display colours of these classes; for overlays only, never used for rendering.
PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (107, 142, 35), (70, 130, 180),
    (0, 0, 142), (153, 153, 153), (220, 220, 0), (220, 20, 60), (119, 11, 32)], dtype=np.uint8)
PALETTE.setflags(write=False)

SPLITS = ("source", "target_train", "target_val")
# Explicit codes (not list positions) so reordering SPLITS never changes a rendered image.
_SPLIT_CODES = {"source": 0, "target_train": 1, "target_val": 2}
MIN_SIZE = 16

_CAM_H = 1.6  # camera height (m): an object this tall reaches the horizon wherever it stands
_ASPECT = 0.5  # u per v for one physical length: images are twice as wide as high
_MIN_SIGN_HALF_U = 2.2 / 128  # rare signs below 2 px half-width at 128 px were not learnable
_MAIN, _DARK, _LIGHT, _MARK = range(4)  # parts of a class, coloured separately by a style


# --------------------------------------------------------------------------- scene (size-free)

@dataclass(frozen=True)
class _Ground:
    """Flat ground seen by a level camera: depth s = 0 at the horizon row, 1 at the bottom row."""

    horizon: float  # v of the horizon
    vp: float  # u of the vanishing point
    road_l: float  # road edges at the bottom row (u); they converge to the vanishing point
    road_r: float
    walk: float  # sidewalk width at the bottom row (u), both sides

    def row(self, s: float) -> float:
        return self.horizon + s * (1.0 - self.horizon)

    def metre(self, s: float) -> tuple[float, float]:
        """(u, v) extent of one metre at depth s."""
        mv = s * (1.0 - self.horizon) / _CAM_H
        return mv * _ASPECT, mv

    def at(self, s: float, bottom_u: float) -> float:
        """u at depth s of the ground line that meets the bottom row at ``bottom_u``."""
        return self.vp + (bottom_u - self.vp) * s

    def walk_u(self, s: float, side: int, t: float) -> float:
        """u on the sidewalk of ``side`` (-1 left, +1 right); t = 0 at the kerb, 1 at the wall."""
        bottom = self.road_l - t * self.walk if side < 0 else self.road_r + t * self.walk
        return self.at(s, bottom)


@dataclass(frozen=True)
class _Block:
    """A column range of the skyline: a building, or a tree line when ``veg``."""

    u0: float
    u1: float
    top: float  # v of the roof
    bump: float  # height of the rounded crowns of a tree line (0 for buildings)
    veg: bool
    inst: int


@dataclass(frozen=True)
class _Obj:
    """A thing standing on the ground at depth ``s`` and column ``u``."""

    kind: str
    s: float
    u: float
    inst: int
    size: float = 1.0  # kind-specific height or radius (m)
    variant: int = 0  # kind-specific: sign shape, bike direction and rider


@dataclass(frozen=True)
class _Scene:
    ground: _Ground
    blocks: tuple[_Block, ...]
    hedges: tuple[tuple[int, float, float, float], ...]  # (side, height ratio, u0, u1)
    lane: float  # bottom u of the dashed lane mark
    objects: tuple[_Obj, ...]  # far to near: painter's order
    jitter: np.ndarray  # [n_inst, 3] per-instance colour jitter in [-1, 1]; row 0 is zero


def _sample_ground(rng: np.random.Generator) -> _Ground:
    return _Ground(horizon=rng.uniform(0.37, 0.45), vp=rng.uniform(0.38, 0.62),
                   road_l=rng.uniform(-0.25, -0.05), road_r=rng.uniform(1.05, 1.25),
                   walk=rng.uniform(0.4, 0.62))


def _sample_blocks(rng: np.random.Generator, g: _Ground, ids) -> tuple[_Block, ...]:
    """Skyline blocks; roofs rise away from the vanishing point as near buildings look taller."""
    base, slope = rng.uniform(0.05, 0.1), rng.uniform(0.5, 0.85)
    blocks, u0 = [], -0.02
    while u0 < 1.0:
        u1 = u0 + rng.uniform(0.07, 0.18)
        veg = bool(rng.random() < 0.2)
        rise = (base + slope * abs(0.5 * (u0 + u1) - g.vp)) * rng.uniform(0.6, 1.3)
        bump = rng.uniform(0.03, 0.07) if veg else 0.0
        blocks.append(_Block(u0, u1, g.horizon - rise, bump, veg, next(ids)))
        u0 = u1
    return tuple(blocks)


def _sample_hedges(rng: np.random.Generator, g: _Ground) -> tuple[tuple[int, float, float, float], ...]:
    hedges = []
    for side in (-1, 1):
        if rng.random() < 0.5:
            a, b = sorted(rng.uniform(0.0, 1.0, 2))
            hedges.append((side, rng.uniform(0.4, 0.8), a, b))
    return tuple(hedges)


def _sample_objects(rng: np.random.Generator, g: _Ground, ids) -> list[_Obj]:
    objs = []
    for _ in range(rng.choice((1, 2, 3), p=(0.4, 0.4, 0.2))):
        s = rng.uniform(0.1, 0.85)
        objs.append(_Obj("car", s, g.at(s, g.road_l + rng.uniform(0.15, 0.85) * (g.road_r - g.road_l)), next(ids)))
    for _ in range(rng.integers(1, 4)):
        s = rng.uniform(0.12, 0.8)
        u = g.walk_u(s, rng.choice((-1, 1)), rng.uniform(0.7, 0.95))
        objs.append(_Obj("tree", s, u, next(ids), size=rng.uniform(1.8, 2.6)))
    for _ in range(rng.integers(1, 4)):
        s = rng.uniform(0.2, 0.85)
        u = g.walk_u(s, rng.choice((-1, 1)), rng.uniform(0.05, 0.25))
        sign = int(rng.random() < 0.5) * int(rng.integers(1, 4))  # 0 none, 1 disc, 2 square, 3 triangle
        objs.append(_Obj("pole", s, u, next(ids), size=rng.uniform(3.6, 6.0), variant=sign))
    for _ in range(rng.integers(1, 4)):
        s = rng.uniform(0.12, 0.75)
        u = g.walk_u(s, rng.choice((-1, 1)), rng.uniform(0.15, 0.85))
        objs.append(_Obj("person", s, u, next(ids), size=rng.uniform(1.6, 1.9)))
    for _ in range(rng.choice(3, p=(0.4, 0.45, 0.15))):
        s = rng.uniform(0.3, 0.7)  # 1.05 m tall: at most ~0.3 of the image height
        side = rng.choice((-1, 1))
        u = g.walk_u(s, side, rng.uniform(-0.1, 0.5))
        variant = int(rng.random() < 0.5) * 2 + int(rng.random() < 0.5)  # bit 1: rider, bit 0: faces left
        objs.append(_Obj("bike", s, u, next(ids), variant=variant))
    return objs


def _sample_scene(rng: np.random.Generator) -> _Scene:
    """All random choices of one scene; none depend on the output resolution."""
    ids = itertools.count(1)
    g = _sample_ground(rng)
    blocks = _sample_blocks(rng, g, ids)
    hedges = _sample_hedges(rng, g)
    lane = g.road_l + rng.uniform(0.4, 0.6) * (g.road_r - g.road_l)
    objects = sorted(_sample_objects(rng, g, ids), key=lambda o: o.s)
    n_inst = 1 + len(blocks) + len(objects)
    jitter = rng.uniform(-1.0, 1.0, (n_inst, 3))
    jitter[0] = 0.0
    return _Scene(g, blocks, hedges, lane, tuple(objects), jitter)


# --------------------------------------------------------------------------- rasterisation

def _shape_rect(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (np.abs(x) <= 1.0) & (np.abs(y) <= 1.0)


def _shape_disc(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return x * x + y * y <= 1.0


def _shape_triangle(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (np.abs(x) <= (y + 1.0) / 2.0 + 0.15) & (np.abs(y) <= 1.0)  # apex up; +0.15 keeps the tip


_SHAPES = {"rect": _shape_rect, "disc": _shape_disc, "triangle": _shape_triangle}


class _Canvas:
    """Label, part and instance maps, painted in relative coordinates with at least one pixel."""

    def __init__(self, height: int, width: int):
        self.label = np.full((height, width), SKY, np.uint8)
        self.part = np.zeros((height, width), np.uint8)
        self.inst = np.zeros((height, width), np.int32)
        self.h, self.w = height, width

    def paint(self, where, mask: np.ndarray, cls: int, part: int = _MAIN, inst: int = 0) -> None:
        """Set ``mask`` (bool, shape of the ``where`` window) to ``cls``/``part``/``inst``."""
        self.label[where][mask] = cls
        self.part[where][mask] = part
        self.inst[where][mask] = inst

    def shape(self, uc: float, vc: float, ru: float, rv: float, cls: int, part: int = _MAIN,
              inst: int = 0, kind: str = "rect", ring: float = 0.0) -> None:
        """Paint a shape centred at (uc, vc) with radii (ru, rv); ``ring`` (v units) hollows a disc."""
        cx, cy = uc * self.w, vc * self.h
        rx, ry = max(ru * self.w, 0.5), max(rv * self.h, 0.5)  # >= 0.5 px: never vanish
        c0, c1 = max(int(np.floor(cx - rx)), 0), min(int(np.ceil(cx + rx)), self.w)
        r0, r1 = max(int(np.floor(cy - ry)), 0), min(int(np.ceil(cy + ry)), self.h)
        if c0 >= c1 or r0 >= r1:
            return
        x = ((np.arange(c0, c1) + 0.5 - cx) / rx)[None, :]
        y = ((np.arange(r0, r1) + 0.5 - cy) / ry)[:, None]
        mask = _SHAPES[kind](x, y)
        if ring > 0.0:
            inner = 1.0 - max(ring * self.h / ry, 1.0 / min(rx, ry))  # keep a ring of >= 1 px
            mask &= x * x + y * y >= inner * abs(inner)
        self.paint((slice(r0, r1), slice(c0, c1)), mask, cls, part, inst)

    def segment(self, a: tuple[float, float], b: tuple[float, float], thick_v: float,
                cls: int, part: int = _MAIN, inst: int = 0) -> None:
        """Paint a thick line from a = (u, v) to b; thickness in v units, at least one pixel."""
        (ax, ay), (bx, by) = (a[0] * self.w, a[1] * self.h), (b[0] * self.w, b[1] * self.h)
        half = max(thick_v * self.h, 1.0) / 2.0
        c0 = max(int(np.floor(min(ax, bx) - half)), 0)
        c1 = min(int(np.ceil(max(ax, bx) + half)), self.w)
        r0 = max(int(np.floor(min(ay, by) - half)), 0)
        r1 = min(int(np.ceil(max(ay, by) + half)), self.h)
        if c0 >= c1 or r0 >= r1:
            return
        px = np.arange(c0, c1)[None, :] + 0.5 - ax
        py = np.arange(r0, r1)[:, None] + 0.5 - ay
        dx, dy = bx - ax, by - ay
        t = np.clip((px * dx + py * dy) / max(dx * dx + dy * dy, 1e-9), 0.0, 1.0)
        mask = (px - t * dx) ** 2 + (py - t * dy) ** 2 <= half * half
        self.paint((slice(r0, r1), slice(c0, c1)), mask, cls, part, inst)


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates: u [1, W] and v [H, 1]."""
    return (np.arange(width)[None, :] + 0.5) / width, (np.arange(height)[:, None] + 0.5) / height


def _paint_skyline(cv: _Canvas, scene: _Scene, u: np.ndarray, v: np.ndarray) -> None:
    """Buildings and tree lines from their roofs down; the street is painted over them later."""
    u0, u1, roof, bump, veg, inst = (np.array(col) for col in zip(
        *((b.u0, b.u1, b.top, b.bump, b.veg, b.inst) for b in scene.blocks)))
    i = np.minimum(np.searchsorted(u1, u[0]), len(scene.blocks) - 1)  # block of each column
    top = roof[i] - bump[i] * np.abs(np.sin(3 * np.pi * (u[0] - u0[i]) / (u1[i] - u0[i])))
    below = v >= top[None, :]
    veg, inst = veg[i][None, :], inst[i][None, :]
    cv.paint(slice(None), below & ~veg, BUILDING, _MAIN, 0)
    cv.paint(slice(None), below & veg, VEGETATION, _MAIN, 0)
    cv.inst[below] = np.broadcast_to(inst, below.shape)[below]


def _paint_street(cv: _Canvas, scene: _Scene, u: np.ndarray, v: np.ndarray) -> None:
    """Road and sidewalks as wedges from the vanishing point, with kerbs, hedges and lane marks."""
    g = scene.ground
    s = (v - g.horizon) / (1.0 - g.horizon)  # [H, 1], negative above the horizon
    ground = s > 0
    road_l, road_r = g.at(s, g.road_l), g.at(s, g.road_r)
    walk_l, walk_r = g.at(s, g.road_l - g.walk), g.at(s, g.road_r + g.walk)
    _paint_hedges(cv, scene, u, s, walk_l, walk_r)
    road = ground & (u >= road_l) & (u <= road_r)
    walk = ground & (u >= walk_l) & (u <= walk_r) & ~road
    cv.paint(slice(None), walk, SIDEWALK)
    kerb = walk & (np.minimum(np.abs(u - road_l), np.abs(u - road_r)) < 0.035 * s)
    cv.part[kerb] = _DARK
    cv.paint(slice(None), road, ROAD)
    depth = 1.0 / np.maximum(s, 1e-3)  # distance along the road: dashes repeat in it, not in rows
    lane = road & (np.abs(u - g.at(s, scene.lane)) < 0.012 * s) & (np.mod(0.9 * depth, 1.0) < 0.5)
    cv.part[lane & (s > 0.04)] = _MARK


def _paint_hedges(cv: _Canvas, scene: _Scene, u, s, walk_l, walk_r) -> None:
    """Hedges: a band of the wall side above the sidewalk's outer edge, as tall as ``ratio`` x camera."""
    g = scene.ground
    for side, ratio, a, b in scene.hedges:
        bottom = g.road_l - g.walk if side < 0 else g.road_r + g.walk
        edge_s = (u - g.vp) / (bottom - g.vp)  # depth at which the outer edge crosses column u
        outside = (u < walk_l) if side < 0 else (u > walk_r)
        mask = (s > 0) & outside & (s > (1.0 - ratio) * edge_s) & (u >= a) & (u <= b)
        cv.paint(slice(None), mask, VEGETATION, _MAIN, 0)


def _draw_car(cv: _Canvas, g: _Ground, o: _Obj) -> None:
    """Rear view: body, cabin, rear window and wheels; 1.8 m wide, 1.5 m tall."""
    mu, mv = g.metre(o.s)
    w, h, base = 1.8 * mu, 1.5 * mv, g.row(o.s)
    cv.shape(o.u, base - 0.37 * h, w / 2, 0.25 * h, CAR, _MAIN, o.inst)
    cv.shape(o.u, base - 0.8 * h, 0.36 * w, 0.2 * h, CAR, _MAIN, o.inst)
    cv.shape(o.u, base - 0.8 * h, 0.28 * w, 0.12 * h, CAR, _DARK, o.inst)
    for side in (-1, 1):
        cv.shape(o.u + side * 0.38 * w, base - 0.08 * h, 0.09 * w, 0.08 * h, CAR, _DARK, o.inst)


def _person_at(cv: _Canvas, u: float, base: float, h: float, w: float, inst: int) -> None:
    """A person of height h (v) and shoulder width w (u) with feet at row ``base``."""
    cv.shape(u, base - 0.25 * h, 0.35 * w, 0.25 * h, PERSON, _DARK, inst)
    cv.shape(u, base - 0.66 * h, 0.5 * w, 0.18 * h, PERSON, _MAIN, inst)
    cv.shape(u, base - 0.91 * h, 0.28 * w, 0.09 * h, PERSON, _LIGHT, inst, kind="disc")


def _draw_person(cv: _Canvas, g: _Ground, o: _Obj) -> None:
    mu, mv = g.metre(o.s)
    _person_at(cv, o.u, g.row(o.s), o.size * mv, 0.5 * mu, o.inst)


def _draw_bike(cv: _Canvas, g: _Ground, o: _Obj) -> None:
    """Side view, 1.7 m long and 1.05 m tall: two wheels, a frame and, for some, a rider."""
    mu, mv = g.metre(o.s)
    base, d = g.row(o.s), (-1.0 if o.variant & 1 else 1.0)
    if o.variant & 2:  # rider drawn first so the frame stays visible over the legs
        _person_at(cv, o.u - d * 0.15 * mu, base - 0.3 * mv, 1.45 * mv, 0.45 * mu, o.inst)
    r, hub_v = 0.34, base - 0.34 * mv
    rear, front = (o.u - d * 0.52 * mu, hub_v), (o.u + d * 0.52 * mu, hub_v)
    for hub in (rear, front):
        cv.shape(hub[0], hub[1], r * mu, r * mv, BICYCLE, _DARK, o.inst, kind="disc", ring=0.08 * mv)
    seat, bar, crank = (o.u - d * 0.18 * mu, base - 0.95 * mv), (o.u + d * 0.4 * mu, base - 1.05 * mv), (o.u, hub_v)
    for a, b in ((rear, seat), (rear, crank), (crank, seat), (seat, bar), (crank, bar), (bar, front)):
        cv.segment(a, b, 0.07 * mv, BICYCLE, _MAIN, o.inst)


def _draw_pole(cv: _Canvas, g: _Ground, o: _Obj) -> None:
    """A pole of ``size`` metres; ``variant`` > 0 mounts a disc, square or triangle sign on top."""
    mu, mv = g.metre(o.s)
    base = g.row(o.s)
    top = base - o.size * mv
    if o.variant:
        half_u = max(0.42 * mu, _MIN_SIGN_HALF_U)
        half_v = half_u / _ASPECT
        top = max(top, 0.01 + half_v)  # keep the sign inside the image
    cv.shape(o.u, 0.5 * (top + base), 0.07 * mu, 0.5 * (base - top), POLE)
    if o.variant:
        kind = ("disc", "rect", "triangle")[o.variant - 1]
        cv.shape(o.u, top, half_u, half_v, SIGN, _MAIN, o.inst, kind=kind)


def _draw_tree(cv: _Canvas, g: _Ground, o: _Obj) -> None:
    """Trunk (2.5 m) and an elliptic crown of radius ``size`` metres."""
    mu, mv = g.metre(o.s)
    base = g.row(o.s)
    cv.shape(o.u, base - 1.4 * mv, 0.18 * mu, 1.4 * mv, VEGETATION, _DARK, o.inst)
    cv.shape(o.u, base - (2.5 + 0.8 * o.size) * mv, o.size * mu, 0.9 * o.size * mv,
             VEGETATION, _MAIN, o.inst, kind="disc")


_DRAW = {"car": _draw_car, "person": _draw_person, "bike": _draw_bike, "pole": _draw_pole, "tree": _draw_tree}


def _rasterise(scene: _Scene, height: int, width: int) -> _Canvas:
    cv = _Canvas(height, width)
    u, v = _grid(height, width)
    _paint_skyline(cv, scene, u, v)
    _paint_street(cv, scene, u, v)
    for obj in scene.objects:
        _DRAW[obj.kind](cv, scene.ground, obj)
    return cv


# --------------------------------------------------------------------------- rendering styles

@dataclass(frozen=True)
class _Style:
    """How a domain looks. ``colours`` [10, 4, 3]: RGB per class and part (main, dark, light, mark)."""

    colours: np.ndarray
    jitter: np.ndarray  # [10] amplitude of the per-instance colour jitter
    sky: tuple[tuple[float, float, float], tuple[float, float, float]]  # zenith, horizon
    target: bool  # which texture set and whether haze, illumination change and blur apply
    noise: float  # std of the pixel noise
    haze: tuple[float, float, float] = (0.0, 0.0, 0.0)
    haze_strength: float = 0.0  # at the horizon; decays with distance (rows) from it
    gain: tuple[float, float, float] = (1.0, 1.0, 1.0)  # illumination colour


def _colour_table(spec: dict[int, tuple]) -> np.ndarray:
    """[10, 4, 3] from {class: (main, dark, light, mark)}; missing or None parts take the main colour.

    The sky's main colour is the mean of its gradient; only checks use it.
    """
    table = np.zeros((NUM_CLASSES, 4, 3), np.float32)
    for cls, parts in spec.items():
        for k in range(4):
            table[cls, k] = parts[k] if k < len(parts) and parts[k] is not None else parts[0]
    return table


SOURCE_STYLE = _Style(
    colours=_colour_table({
        ROAD: ((88, 88, 92), None, None, (235, 235, 225)),
        SIDEWALK: ((182, 166, 150), (140, 130, 125)),
        BUILDING: ((152, 96, 74), (55, 65, 90)),
        VEGETATION: ((62, 136, 46), (95, 68, 42)),
        SKY: ((120, 170, 230),),
        CAR: ((40, 70, 170), (28, 30, 40)),
        POLE: ((222, 212, 64),),
        SIGN: ((236, 140, 32),),
        PERSON: ((200, 50, 160), (70, 40, 80), (205, 140, 100)),
        BICYCLE: ((30, 200, 190), (25, 70, 70)),
    }),
    jitter=np.array([0, 0, 18, 8, 0, 28, 8, 8, 22, 10], np.float32),
    sky=((70, 130, 220), (165, 200, 240)),
    target=False, noise=3.0,
)

# Class-dependent shift: the big classes turn to the greys of an overcast city (road light and
# dusty, buildings blue-grey concrete, sky and haze neutral grey, vegetation darker), sidewalk and
# car shift less, the rare classes least (mostly haze and blur), so some classes transfer easily and
# others poorly. Big classes may come to resemble each other's source colours (road looks like
# sidewalk, buildings like road, as between GTA5 and Cityscapes), but no target class comes near a
# rare class's source colour: an earlier palette with a cream sky and haze and a maroon road made the
# source model call target sky "traffic sign"/"person" and road "building", and CBST then
# reinforced those confident mistakes (rare-class pseudo-label precision 15-40 %).
TARGET_STYLE = _Style(
    colours=_colour_table({
        ROAD: ((150, 146, 150), None, None, (110, 110, 115)),
        SIDEWALK: ((206, 168, 200), (165, 130, 160)),
        BUILDING: ((96, 104, 118), (60, 66, 78)),
        VEGETATION: ((52, 104, 44), (60, 50, 40)),
        SKY: ((205, 208, 214),),
        CAR: ((50, 80, 195), (35, 35, 45)),
        POLE: ((214, 204, 84),),
        SIGN: ((240, 126, 44),),
        PERSON: ((214, 64, 140), (60, 40, 60), (200, 135, 105)),
        BICYCLE: ((40, 188, 200), (30, 60, 70)),
    }),
    jitter=np.array([0, 0, 10, 8, 0, 28, 8, 8, 22, 10], np.float32),
    sky=((180, 186, 196), (222, 224, 228)),
    target=True, noise=6.0,
    haze=(208.0, 210.0, 214.0), haze_strength=0.5, gain=(1.0, 0.96, 0.92),
)


def _low_freq(rng: np.random.Generator, height: int, width: int, cells: tuple[int, int]) -> np.ndarray:
    """Smooth noise [H, W] (std ~ 0.5-1) with about ``cells`` blobs over the image."""
    coarse = rng.standard_normal((cells[0] + 1, cells[1] + 1))
    return ndimage.zoom(coarse, (height / (cells[0] + 1), width / (cells[1] + 1)), order=1)


def _texture_source(img: np.ndarray, cv: _Canvas, u, v, style: _Style, rng) -> None:
    """Game look: asphalt grain, window grids, leaf noise."""
    fine = rng.standard_normal(cv.label.shape)
    road, veg, bld = cv.label == ROAD, cv.label == VEGETATION, cv.label == BUILDING
    img[road & (cv.part == _MAIN)] += 9.0 * fine[road & (cv.part == _MAIN), None]
    img[veg] *= 1.0 + 0.25 * fine[veg, None]
    windows = (np.mod(u * 38.0, 1.0) > 0.35) & (np.mod(v * 15.0, 1.0) > 0.4)
    img[bld & windows] = style.colours[BUILDING, _DARK]


def _texture_target(img: np.ndarray, cv: _Canvas, u, v, style: _Style, rng) -> None:
    """Other city: blotchy road, banded facades, cloudy sky, smooth foliage."""
    h, w = cv.label.shape
    blotch, clouds = _low_freq(rng, h, w, (3, 6)), _low_freq(rng, h, w, (4, 8))
    road, veg, bld, sky = (cv.label == c for c in (ROAD, VEGETATION, BUILDING, SKY))
    img[road] *= 1.0 + 0.22 * blotch[road, None]
    img[sky] += 14.0 * clouds[sky, None]
    img[veg] *= 1.0 + 0.15 * clouds[veg, None]
    bands = np.broadcast_to(np.mod(v * 11.0, 1.0) < 0.35, bld.shape)
    img[bld & bands] = style.colours[BUILDING, _DARK]


def _shade(cv: _Canvas, scene: _Scene, style: _Style, rng: np.random.Generator) -> np.ndarray:
    """Colours [H, W, 3] float of a rasterised scene in ``style``."""
    img = style.colours[cv.label, cv.part].astype(np.float32)
    img += style.jitter[cv.label][..., None] * scene.jitter[cv.inst].astype(np.float32)
    u, v = _grid(*cv.label.shape)
    sky = cv.label == SKY
    t = np.broadcast_to(np.clip(v / scene.ground.horizon, 0.0, 1.0), sky.shape)[sky, None]
    img[sky] = (1.0 - t) * np.array(style.sky[0], np.float32) + t * np.array(style.sky[1], np.float32)
    (_texture_target if style.target else _texture_source)(img, cv, u, v, style, rng)
    if style.target:
        img = _target_effects(img, scene, style, u, v, rng)
    img += style.noise * rng.standard_normal(img.shape, dtype=np.float32)
    return img


def _target_effects(img: np.ndarray, scene: _Scene, style: _Style, u, v, rng) -> np.ndarray:
    """Illumination change, haze growing towards the horizon, mild blur; fixed strength, small jitter."""
    h = img.shape[0]
    gain = np.array(style.gain, np.float32) * rng.uniform(0.97, 1.03, 3).astype(np.float32)
    side_light = 1.0 + 0.12 * (u - 0.5) * rng.choice((-1.0, 1.0))  # [1, W]
    img = img * gain * side_light[..., None]
    strength = style.haze_strength * rng.uniform(0.9, 1.1)
    haze = (strength * np.exp(-np.abs(v - scene.ground.horizon) / 0.12))[..., None]  # [H, 1, 1]
    img = img * (1.0 - haze) + np.array(style.haze, np.float32) * haze
    sigma = 0.6 * h / 64.0
    return ndimage.gaussian_filter(img, sigma=(sigma, sigma, 0.0))


# --------------------------------------------------------------------------- public API

def _check(split: str, height: int, width: int) -> int:
    if split not in _SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    for name, size in (("height", height), ("width", width)):
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
            raise ValueError(f"{name} must be an integer >= {MIN_SIZE}, got {size!r}")
    return _SPLIT_CODES[split]


def render(split: str, index: int, *, seed: int = 0, height: int = 64,
           width: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Render one image of the benchmark.

    Args:
        split: "source" (source style) or "target_train" / "target_val" (target style); each split
            has its own scene stream.
        index, seed: non-negative; image ``index`` is independent of every other image.
    Returns:
        image uint8 [H, W, 3] RGB and label uint8 [H, W] with class ids 0..9. Deterministic in
        (split, index, seed, height, width); the label layout depends on the size only by rounding.
    Raises:
        ValueError: unknown split, size below ``MIN_SIZE`` or not an integer, negative index or seed.
    """
    code = _check(split, height, width)
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be >= 0, got index={index}, seed={seed}")
    # Scene and texture streams are separate so the scene is identical at every resolution.
    scene = _sample_scene(np.random.default_rng([seed, code, index, 0]))
    canvas = _rasterise(scene, height, width)
    style = SOURCE_STYLE if split == "source" else TARGET_STYLE
    img = _shade(canvas, scene, style, np.random.default_rng([seed, code, index, 1]))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), canvas.label


def _save_png(path: Path, array: np.ndarray) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def write_benchmark(out_dir, *, seed: int = 0, num_source: int = 600, num_target_train: int = 400,
                    num_target_val: int = 200, height: int = 64, width: int = 128) -> Path:
    """Write ``out/<split>/{images,labels}/<split>_<index:05d>.png`` and ``out/benchmark.yaml``.

    Images are RGB, labels mode "L" with class ids. Every file is written atomically and the yaml
    last, so its presence marks a complete benchmark. Returns the output folder.
    """
    counts = {"source": num_source, "target_train": num_target_train, "target_val": num_target_val}
    for split, n in counts.items():
        _check(split, height, width)
        if n < 0:
            raise ValueError(f"num_{split} must be >= 0, got {n}")
    out = Path(out_dir)
    jobs = [(split, i) for split in SPLITS for i in range(counts[split])]
    for split, i in _progress(jobs):
        image, label = render(split, i, seed=seed, height=height, width=width)
        name = f"{split}_{i:05d}.png"
        _save_png(out / split / "images" / name, image)
        _save_png(out / split / "labels" / name, label)
    meta = {"seed": seed, "height": height, "width": width, "counts": counts,
            "num_classes": NUM_CLASSES, "class_names": list(CLASS_NAMES), "splits": list(SPLITS)}
    write_text_atomic(out / "benchmark.yaml", yaml.safe_dump(meta, sort_keys=False))
    logger.info("wrote synthetic benchmark (%d images, %dx%d) to %s", len(jobs), height, width, out)
    return out


def _progress(items: list):
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are optional
        return items
    return tqdm(items, desc="rendering", unit="img", leave=False, disable=None)
