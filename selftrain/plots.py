"""Per-run plots from metrics.jsonl, written to ``<run>/plots/`` after every round.

- ``score.png``: target mIoU (or mAP) per round, round 0 = source only.
- ``class_iou.png``: IoU (or AP) per class per round as an annotated heat map.
- ``pseudo_distribution.png``: share of the pseudo-labels per class, one stacked bar per round.
- ``thresholds.png``: threshold per class per round (log scale).

The records come from :func:`selftrain.inspect.read_metrics`, which already refuses a damaged line
and leaves out a torn last one; a record whose per-class lists do not have one number per class
(an edited file, or a run of another label set) is left out of the plot it does not fit, with a
warning, so that drawing never stops a run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .io import atomic_path
from .metrics import headline
from .types import RoundLabels
from .overlay import palette_for

log = logging.getLogger(__name__)


def plot_run(records: Sequence[dict[str, Any]], class_names: Sequence[str], out_dir: str | Path) -> list[Path]:
    """Write every plot the records support; returns the files written."""
    out_dir = Path(out_dir)
    palette = palette_for(class_names) / 255.0
    evaluated = _fitting(records, "eval", len(class_names), _eval_fits)
    labelled = _fitting(records, "pseudo", len(class_names), _pseudo_fits)
    written = []
    if evaluated:
        written.append(_save(_score_figure(evaluated), out_dir / "score.png"))
        written.append(_save(_class_score_figure(evaluated, class_names), out_dir / "class_iou.png"))
    if labelled:
        written.append(_save(_distribution_figure(labelled, class_names, palette), out_dir / "pseudo_distribution.png"))
        written.append(_save(_threshold_figure(labelled, class_names, palette), out_dir / "thresholds.png"))
    return written


def _fitting(records: Sequence[dict[str, Any]], key: str, num_classes: int, fits) -> list[dict[str, Any]]:
    """The records with a ``key`` entry that ``fits(entry, num_classes)``; the others are logged and left out."""
    out = []
    for record in records:
        entry = record.get(key)
        if not entry:
            continue
        if isinstance(entry, dict) and fits(entry, num_classes):
            out.append(record)
        else:
            log.warning("metrics.jsonl: the %r entry of round %s does not fit %d classes; left out of the plots",
                        key, record.get("round"), num_classes)
    return out


def _numbers(values: Any, n: int) -> bool:
    """Whether ``values`` is a list of ``n`` numbers (None allowed, drawn as a gap)."""
    return isinstance(values, list) and len(values) == n and all(
        v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values)


def _eval_fits(entry: dict[str, Any], num_classes: int) -> bool:
    key, per_class = ("miou", "iou") if "miou" in entry else ("map", "ap")
    score = entry.get(key)
    is_number = isinstance(score, (int, float)) and not isinstance(score, bool)
    return is_number and _numbers(entry.get(per_class), num_classes)


def _pseudo_fits(entry: dict[str, Any], num_classes: int) -> bool:
    counts = entry.get("selected_boxes", entry.get("selected_pixels"))
    if not (_numbers(counts, num_classes) and None not in counts):
        return False
    thresholds = entry.get("thresholds")
    if thresholds is None and "selected_boxes" in entry:
        return _numbers([entry.get("threshold")], 1)
    return _numbers(thresholds, num_classes)


def _metric(record: dict[str, Any]) -> tuple[str, float, list[float | None]]:
    return headline(record["eval"])


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _score_figure(records):
    fig = _figure(5, 3.2)
    ax = fig.add_subplot()
    name = _metric(records[0])[0]
    rounds = [r["round"] for r in records]
    scores = [_metric(r)[1] for r in records]
    ax.plot(rounds, scores, marker="o")
    ax.margins(x=0.1, y=0.2)
    for x, y in zip(rounds, scores):
        ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xticks(rounds, ["source\nonly" if x == 0 else str(x) for x in rounds])
    ax.set_xlabel("round")
    ax.set_ylabel(f"target {name} (%)")
    ax.grid(alpha=0.3)
    return fig


def _class_score_figure(records, class_names):
    name = _metric(records[0])[0]
    values = np.array([[np.nan if v is None else v for v in _metric(r)[2]] for r in records], dtype=float).T
    fig = _figure(1.2 + 0.7 * len(records), 0.8 + 0.28 * len(class_names))
    ax = fig.add_subplot()
    ax.imshow(values, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for (c, r), v in np.ndenumerate(values):
        text = "-" if np.isnan(v) else f"{v:.0f}"
        ax.text(r, c, text, ha="center", va="center", fontsize=7, color="white" if np.isnan(v) or v < 60 else "black")
    ax.set_xticks(range(len(records)), ["src" if r["round"] == 0 else str(r["round"]) for r in records])
    ax.set_yticks(range(len(class_names)), class_names, fontsize=8)
    ax.set_xlabel("round")
    ax.set_title(f"{'IoU' if name == 'mIoU' else 'AP'} per class (%)", fontsize=9)
    return fig


def _distribution_figure(records, class_names, palette):
    fig = _figure(1.8 + 0.8 * len(records), 4)
    ax = fig.add_subplot()
    rounds = [str(r["round"]) for r in records]
    counts = np.array([RoundLabels.from_dict(r["pseudo"]).selected for r in records], dtype=float)
    shares = 100 * counts / np.maximum(counts.sum(1, keepdims=True), 1)
    bottom = np.zeros(len(records))
    for c, name in enumerate(class_names):
        ax.bar(rounds, shares[:, c], bottom=bottom, color=palette[c], label=name, edgecolor="white", linewidth=0.3)
        bottom += shares[:, c]
    ax.set_xlabel("round")
    ax.set_ylabel("share of pseudo-labels (%)")
    ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left", frameon=False)
    fig.tight_layout()
    return fig


def _threshold_figure(records, class_names, palette):
    fig = _figure(6.5, 3.6)
    ax = fig.add_subplot()
    rounds = [r["round"] for r in records]
    thresholds = np.array([RoundLabels.from_dict(r["pseudo"]).class_thresholds() for r in records], dtype=float)
    for c, name in enumerate(class_names):
        ax.plot(rounds, thresholds[:, c], marker="o", color=palette[c], label=name)
    if np.nanmin(thresholds) > 0:
        ax.set_yscale("log")
    ax.set_xticks(rounds)
    ax.set_xlabel("round")
    ax.set_ylabel("threshold (probability)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left", frameon=False)
    fig.tight_layout()
    return fig


def _save(fig, path: Path) -> Path:
    if not fig.get_tight_layout():
        fig.tight_layout()
    with atomic_path(path, suffix=".png.tmp") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path
