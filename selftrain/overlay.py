"""Pictures of pseudo-labels: Cityscapes colours, overlays with ignored pixels hatched, boxes, sheets.

Pure numpy for the pixels (so tests can check them) and matplotlib only to lay panels out with
titles and a legend.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .io import atomic_path

# Short names used by data sets for Cityscapes classes.
_ALIASES = {"light": "traffic light", "sign": "traffic sign", "motorbike": "motorcycle", "bike": "bicycle",
            "tree": "vegetation", "trafficlight": "traffic light", "trafficsign": "traffic sign"}


def cityscapes_label(name: str):
    """The cityscapesscripts label record for a class name (``traffic_sign``, ``sign``, ...), or None."""
    from cityscapesscripts.helpers.labels import name2label

    key = name.lower().replace("_", " ").strip()
    return name2label.get(_ALIASES.get(key.replace(" ", ""), _ALIASES.get(key, key)))


def palette_for(class_names: Sequence[str]) -> np.ndarray:
    """Display colours [C, 3] uint8: the Cityscapes colour of each Cityscapes class name, tab20 otherwise."""
    from matplotlib import colormaps

    tab = (np.asarray(colormaps["tab20"].colors) * 255).round().astype(np.uint8)
    out = np.zeros((len(class_names), 3), dtype=np.uint8)
    spare = 0
    for c, name in enumerate(class_names):
        label = cityscapes_label(str(name))
        if label is not None and label.trainId not in (255, -1):
            out[c] = label.color
        else:
            out[c] = tab[spare % len(tab)]
            spare += 1
    return out


def hatch_mask(shape: tuple[int, int]) -> np.ndarray:
    """Thin diagonal stripes [H, W] bool, used to mark ignored pixels (spacing grows with the image)."""
    period = max(5, min(shape) // 24)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((xx + yy) % period) == 0


def overlay(image: np.ndarray, labels: np.ndarray, palette: np.ndarray, ignore_index: int,
            alpha: float = 0.6) -> np.ndarray:
    """Blend class colours onto ``image``; ignored pixels darkened and hatched in grey.

    Shape: image [H, W, 3] uint8, labels [H, W] int -> [H, W, 3] uint8.
    """
    labels = np.asarray(labels).astype(np.int64)
    ignored = labels == ignore_index
    colours = palette[np.where(ignored, 0, labels).clip(0, len(palette) - 1)].astype(np.float32)
    base = image.astype(np.float32)
    out = np.where(ignored[..., None], 0.45 * base, (1 - alpha) * base + alpha * colours)
    out[ignored & hatch_mask(labels.shape)] = 160.0
    return out.round().clip(0, 255).astype(np.uint8)


def resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map to ``shape`` (H, W)."""
    if labels.shape == tuple(shape):
        return labels
    rows = (np.arange(shape[0]) * labels.shape[0] / shape[0]).astype(int)
    cols = (np.arange(shape[1]) * labels.shape[1] / shape[1]).astype(int)
    return labels[rows][:, cols]


@dataclass(frozen=True)
class Boxes:
    """Boxes to draw on one panel: xyxy [K, 4], labels 1..C [K], and a caption per box."""

    boxes: np.ndarray
    labels: np.ndarray
    captions: list[str]


@dataclass(frozen=True)
class Panel:
    """One picture in a figure: pixels, a title, and optionally boxes drawn over it."""

    pixels: np.ndarray
    title: str
    boxes: Boxes | None = None


def box_captions(class_names: Sequence[str], labels: np.ndarray, scores: np.ndarray | None = None,
                 srrs: np.ndarray | None = None) -> list[str]:
    """``car 0.91`` or ``car 0.91 srrs 0.84`` per box."""
    out = []
    for k, label in enumerate(np.asarray(labels).astype(int)):
        text = class_names[label - 1] if 1 <= label <= len(class_names) else f"class {label}"
        if scores is not None:
            text += f" {float(scores[k]):.2f}"
        if srrs is not None and np.isfinite(srrs[k]):
            text += f" srrs {float(srrs[k]):.2f}"
        out.append(text)
    return out


def save_figure(rows: Sequence[Sequence[Panel]], out_png: str | Path, *, palette: np.ndarray,
                class_names: Sequence[str], legend_classes: Sequence[int] = (), title: str | None = None) -> Path:
    """Lay panels out in rows (one image per row), add a class legend, write the PNG atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = max(len(r) for r in rows)
    height, width = rows[0][0].pixels.shape[:2]
    panel_w = 4.0
    fig = Figure(figsize=(panel_w * ncols, len(rows) * panel_w * height / width + 0.8 + 0.3 * bool(legend_classes)))
    FigureCanvasAgg(fig)
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            ax = fig.add_subplot(len(rows), ncols, r * ncols + c + 1)
            _draw_panel(ax, panel, palette)
    if legend_classes:
        _legend(fig, palette, class_names, legend_classes)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06 if legend_classes else 0, 1, 1))
    out_png = Path(out_png)
    with atomic_path(out_png, suffix=".png.tmp") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return out_png


def _draw_panel(ax, panel: Panel, palette: np.ndarray) -> None:
    from matplotlib.patches import Rectangle

    ax.imshow(panel.pixels, interpolation="nearest")
    ax.set_title(panel.title, fontsize=8)
    ax.set_axis_off()
    if panel.boxes is None:
        return
    for box, label, caption in zip(panel.boxes.boxes, panel.boxes.labels, panel.boxes.captions):
        colour = palette[(int(label) - 1) % len(palette)] / 255.0
        x0, y0, x1, y1 = (float(v) for v in box)
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1.2))
        ax.text(x0, y0, caption, fontsize=5, color="white", va="bottom",
                bbox={"facecolor": colour, "alpha": 0.8, "pad": 0.5, "linewidth": 0})


def _legend(fig, palette: np.ndarray, class_names: Sequence[str], classes: Sequence[int]) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=palette[c] / 255.0, label=class_names[c]) for c in classes]
    handles.append(Patch(facecolor=(0.63, 0.63, 0.63), hatch="///", label="ignored"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 10), fontsize=7, frameon=False)
