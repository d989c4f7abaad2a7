"""Round-by-round statistics over a run directory: what each round labelled, and what changed.

Counts come from the pseudo-label files themselves (``selected_pixels`` as the writer stored it,
or a scan of ``labels`` with ``recount=True``; boxes are always counted from ``labels``);
precision and the model's score after each round come from ``metrics.jsonl``, which the engine
fills where the target set has ground truth; so does, for online detection rounds, what the
policy's threshold saw (``pseudo.selection``: SRRS or score quantiles of the final detections and
the share at or above epsilon), which tells why a round kept few boxes or none.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .checkpoint import RunDir, read_records
from .errors import StoreError, UserError
from .metrics import bincount_skipping, headline
from .progress import progress
from .store import RoundReader, open_round
from .types import RoundLabels

log = logging.getLogger(__name__)
_RESTORE = "restore it or rerun with --resume"


@dataclass(frozen=True)
class RoundStats:
    """One row of ``selftrain labels summary``; ``counts`` are pixels or boxes per class [C]."""

    round: int
    policy: str | None
    portion: float | None
    images: int
    unit: str  # "pixels" or "boxes"
    counts: list[int]
    labelled_share: float | None  # selected / all pixels of the round (segmentation)
    thresholds: list[float] | None
    precision: list[float | None] | None
    precision_overall: float | None
    metric: str | None  # "mIoU" or "mAP"
    score: float | None
    selection: dict[str, Any] | None = None  # online detection: metrics.jsonl's pseudo.selection

    @property
    def total(self) -> int:
        return int(sum(self.counts))

    def shares(self) -> list[float]:
        """Share of each class among the labelled pixels or boxes."""
        return [c / self.total if self.total else 0.0 for c in self.counts]


def open_run(path: str | Path) -> RunDir:
    """A run directory written by ``selftrain run``; a UserError naming the fix otherwise."""
    run = RunDir(Path(path))
    if not run.root.is_dir():
        raise UserError(f"run directory {run.root} does not exist; pass the --out directory of `selftrain run`")
    if not run.config.is_file():
        raise UserError(f"{run.root} is not a selftrain run directory (no config.yaml); "
                        "pass the --out directory of `selftrain run`")
    return run


def run_class_names(path: str | Path) -> list[str]:
    """Class names of a run: from its first pseudo-label file, else its evaluation files, else its recipe."""
    run = open_run(path)
    rounds = pseudo_rounds(run)
    if rounds:
        with open_round_of(run, rounds[0]) as reader:
            return list(reader.meta["class_names"])
    for file in sorted((run.root / "eval").glob("round_*.json")):
        return _eval_class_names(file)
    cfg = run_recipe(run)
    return list(cfg.data.class_names or [f"class_{i}" for i in range(cfg.data.num_classes)])


def run_recipe(run: RunDir) -> Any:
    """The run's resolved recipe (``config.yaml``) as a RunConfig; a UserError when the file cannot be read."""
    from .config import load_recipe

    try:
        return load_recipe(run.config)
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {run.config} ({exc.__class__.__name__}); restore the run's config.yaml") from None


def _eval_class_names(file: Path) -> list[str]:
    """``class_names`` of an evaluation file (``eval/round_NNN.json``)."""
    try:
        names = json.loads(file.read_text()).get("class_names", [])
    except (OSError, ValueError, AttributeError) as exc:
        raise UserError(f"{file} is not a JSON object ({exc.__class__.__name__}); {_RESTORE}") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UserError(f"{file} has class_names that are not a list of names; {_RESTORE}")
    return names


def pseudo_rounds(run: RunDir) -> list[int]:
    """Rounds with a pseudo-label file, in order."""
    folder = run.root / "pseudo"
    if not folder.is_dir():
        return []
    return sorted(int(p.stem.split("_")[1]) for p in folder.glob("round_[0-9][0-9][0-9].h5"))


def read_metrics(run: RunDir) -> dict[int, dict[str, Any]]:
    """metrics.jsonl by round (the last record of a round wins); empty when the file is absent.

    A last line that does not parse is a record torn by a kill mid-write: it is left out with a
    warning. A damaged line before it is a UserError naming the file and the line.
    """
    return {record["round"]: record for record in read_records(run.metrics, check=check_record)}


def check_record(record: dict[str, Any]) -> None:
    """The fields the summary and plots read, checked in a parsed record; ValueError saying what is
    wrong otherwise."""
    for key in ("eval", "pseudo"):
        if record.get(key) is not None and not isinstance(record[key], dict):
            raise ValueError(f"an {key!r} entry that is not an object")
    evaluation = record.get("eval") or {}
    if evaluation and not any(_is_number(evaluation.get(k)) for k in ("miou", "map")):
        raise ValueError("an 'eval' entry without a numeric miou or map")
    if any(not isinstance(evaluation.get(k, []), list) for k in ("iou", "ap")):
        raise ValueError("per-class scores that are not a list")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def open_round_of(run: RunDir, round_index: int, *, check_recipe: bool = False) -> RoundReader:
    """The complete pseudo-label file of one round, checked against the run's ``config.yaml``: task,
    class count (and names, where the recipe lists them), the round its name gives and, with
    ``check_recipe``, the recipe itself (StoreError names the fix otherwise)."""
    path = run.pseudo(round_index)
    if not path.is_file():
        have = ", ".join(map(str, pseudo_rounds(run))) or "none"
        raise StoreError(f"round {round_index} has no pseudo-label file {path}; rounds with labels: {have}")
    cfg = run_recipe(run)
    recipe = None
    if check_recipe:
        try:
            recipe = run.config.read_text()
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read {run.config} ({exc.__class__.__name__}); {_RESTORE}") from None
    return open_round(path, expect_task=cfg.task, expect_num_classes=cfg.data.num_classes,
                      expect_class_names=cfg.data.class_names, expect_round=round_index, expect_recipe=recipe)


def summarize_run(path: str | Path, *, recount: bool = False) -> list[RoundStats]:
    """Round 0 (source only, from metrics) and one row per pseudo-labelled round."""
    run = open_run(path)
    metrics = read_metrics(run)
    rows = [_metrics_only_row(metrics[0])] if 0 in metrics else []
    for r in pseudo_rounds(run):
        with open_round_of(run, r, check_recipe=True) as reader:
            rows.append(round_stats(reader, _pseudo_checked(run, r, metrics.get(r, {}), reader), recount=recount))
    return rows


def _pseudo_checked(run: RunDir, r: int, record: dict[str, Any], reader: RoundReader) -> dict[str, Any]:
    """``record`` when the ``pseudo`` fields the summary prints have the right types and one entry
    per class of ``reader``; a UserError naming the round otherwise."""
    pseudo, num_classes = record.get("pseudo") or {}, reader.meta["num_classes"]
    problem = None
    if "threshold" in pseudo and pseudo["threshold"] is not None and not _is_number(pseudo["threshold"]):
        problem = "pseudo.threshold is not a number"
    for key in ("thresholds", "precision"):
        values = pseudo.get(key)
        if values is not None and not (isinstance(values, list) and len(values) == num_classes
                                       and all(v is None or _is_number(v) for v in values)):
            problem = f"pseudo.{key} is not {num_classes} numbers (one per class)"
    if pseudo.get("precision_overall") is not None and not _is_number(pseudo["precision_overall"]):
        problem = "pseudo.precision_overall is not a number"
    selection = pseudo.get("selection")
    if selection is not None and not _selection_ok(selection):
        problem = "pseudo.selection lacks a numeric epsilon, detections, at_least_epsilon or quantiles"
    if problem:
        raise UserError(f"{run.metrics}: the record of round {r} is malformed ({problem}); {_RESTORE}")
    return record


def _selection_ok(selection: Any) -> bool:
    """Whether an online round's ``pseudo.selection`` has the numbers the selection table prints."""
    if not isinstance(selection, dict):
        return False
    quantiles, share = selection.get("quantiles") or {}, selection.get("share")
    return (all(_is_number(selection.get(k)) for k in ("epsilon", "detections", "at_least_epsilon"))
            and (share is None or _is_number(share)) and isinstance(quantiles, dict)
            and all(v is None or _is_number(v) for v in quantiles.values()))


def round_stats(reader: RoundReader, record: dict[str, Any], *, recount: bool = False) -> RoundStats:
    """Statistics of one pseudo-label file plus the matching metrics record."""
    meta, pseudo = reader.meta, record.get("pseudo") or {}
    counts, share = _counts(reader, recount)
    # offline policies store their thresholds in the file, online ones only in metrics.jsonl
    stored = reader.thresholds if reader.thresholds is not None else _record_thresholds(pseudo, reader)
    thresholds = None if stored is None else [float(t) for t in stored]
    if thresholds is not None and all(math.isnan(t) for t in thresholds):
        thresholds = None
    metric, score = _score(record)
    return RoundStats(
        round=int(meta["round"]), policy=meta.get("policy"), portion=_float(meta.get("portion")), images=len(reader),
        unit="pixels" if reader.task == "segmentation" else "boxes", counts=counts, labelled_share=share,
        thresholds=thresholds, precision=pseudo.get("precision"), precision_overall=pseudo.get("precision_overall"),
        metric=metric, score=score, selection=pseudo.get("selection"),
    )


def _record_thresholds(pseudo: dict[str, Any], reader: RoundReader) -> list[float] | None:
    """An online round's thresholds as its record gives them (one per class)."""
    if not pseudo:
        return None
    labels = RoundLabels.from_dict(pseudo)
    if labels.thresholds is None and labels.threshold is None:
        return None
    return labels.thresholds if labels.thresholds is not None else [labels.threshold] * int(reader.meta["num_classes"])


def count_labels(reader: RoundReader, *, block: int = 16) -> np.ndarray:
    """Pixels (segmentation) or boxes (detection) per class, read straight from the file. -> [C] int64"""
    num_classes = int(reader.meta["num_classes"])
    if reader.task == "detection":
        labels = torch.from_numpy(reader.label_rows(0, None).astype(np.int64))
        return bincount_skipping(labels - 1, (labels < 1) | (labels > num_classes), num_classes).numpy()
    ignore = int(reader.meta["ignore_index"])
    total = torch.zeros(num_classes, dtype=torch.int64)
    for start in progress(range(0, len(reader), block), desc="count labels", unit="block"):
        chunk = torch.from_numpy(reader.label_rows(start, start + block).astype(np.int64))
        total += bincount_skipping(chunk, chunk == ignore, num_classes)
    return total.numpy()


def _counts(reader: RoundReader, recount: bool) -> tuple[list[int], float | None]:
    stored = reader.selected_pixels if reader.task == "segmentation" else None
    counts = count_labels(reader) if recount or stored is None else np.asarray(stored)
    share = None
    if reader.task == "segmentation" and len(reader):
        height, width = reader.image_shape
        share = float(counts.sum()) / (len(reader) * height * width)
    return [int(c) for c in counts], share


def _metrics_only_row(record: dict[str, Any]) -> RoundStats:
    metric, score = _score(record)
    return RoundStats(round=int(record["round"]), policy=None, portion=None, images=0, unit="pixels", counts=[],
                      labelled_share=None, thresholds=None, precision=None, precision_overall=None,
                      metric=metric, score=score)


def _score(record: dict[str, Any]) -> tuple[str | None, float | None]:
    evaluation = record.get("eval") or {}
    if not evaluation:
        return None, None
    metric, value, _ = headline(evaluation)
    return metric, value


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


# ---------------------------------------------------------------------------------------------
# Rendering


def summary_json(rows: Sequence[RoundStats], class_names: Sequence[str]) -> str:
    """Everything in the summary, for scripts (NaN-free JSON)."""
    out = [{**asdict(row), "shares": row.shares(), "total": row.total} for row in rows]
    return json.dumps({"class_names": list(class_names), "rounds": out}, indent=2)


def format_summary(rows: Sequence[RoundStats], class_names: Sequence[str]) -> str:
    """One line per round, then per-class tables (share, threshold, precision) with rounds as columns."""
    head = f"{'round':>5} {'policy':>8} {'portion':>8} {'images':>7} {'labelled':>16} {'precision':>10} {'score':>12}"
    lines = [head]
    for row in rows:
        lines.append(_round_line(row))
    selected = [row for row in rows if row.selection]
    if selected:
        lines += ["", *_selection_table(selected)]
    labelled = [row for row in rows if row.counts]
    if labelled:
        lines += ["", *_class_table("share of labels %", labelled, class_names, lambda r, c: _pct(r.shares()[c]))]
        lines += ["", *_class_table("threshold", labelled, class_names, lambda r, c: _num(r.thresholds, c))]
        if any(row.precision for row in labelled):
            lines += ["", *_class_table("precision %", labelled, class_names, lambda r, c: _prec(r.precision, c))]
    return "\n".join(lines)


def _round_line(row: RoundStats) -> str:
    if not row.counts:
        labelled = "(source only)"
    elif row.unit == "pixels":
        labelled = f"{row.total} ({100 * (row.labelled_share or 0):.1f}%)"
    else:
        labelled = f"{row.total} boxes"
    portion = "-" if row.portion is None else f"{row.portion:.2f}"
    precision = "-" if row.precision_overall is None else f"{100 * row.precision_overall:.1f}"
    score = "-" if row.score is None else f"{row.metric} {row.score:.1f}"
    images = row.images or "-"
    return f"{row.round:>5} {row.policy or '-':>8} {portion:>8} {images:>7} {labelled:>16} {precision:>10} {score:>12}"


def _selection_table(rows: Sequence[RoundStats]) -> list[str]:
    """Per online detection round: the criterion's quantiles over all final detections, how many reach
    epsilon, and the precision of the boxes kept."""
    lines = ["final detections of the target images: the criterion the threshold epsilon is applied to",
             f"{'round':>5} {'criterion':>9} {'candidates':>10} {'epsilon':>7} {'detections':>10} {'>= eps':>7} "
             f"{'share %':>7} {'p50':>6} {'p90':>6} {'p99':>6} {'max':>6} {'kept prec %':>11}"]
    for row in rows:
        s, q = row.selection, row.selection.get("quantiles") or {}
        share = "-" if s.get("share") is None else f"{100 * s['share']:.2f}"
        precision = "-" if row.precision_overall is None else f"{100 * row.precision_overall:.1f}"
        cells = "".join(f" {'-' if q.get(k) is None else format(q[k], '.3f'):>6}" for k in ("p50", "p90", "p99", "max"))
        lines.append(f"{row.round:>5} {s.get('criterion') or '-':>9} {s.get('candidates') or '-':>10} "
                     f"{s['epsilon']:>7.3f} {s['detections']:>10} {s['at_least_epsilon']:>7} {share:>7}{cells}"
                     f" {precision:>11}")
    return lines


def _class_table(title: str, rows: Sequence[RoundStats], class_names: Sequence[str], cell) -> list[str]:
    width = max([len(title), *(len(n) for n in class_names)]) + 2
    lines = [f"{title:<{width}}" + "".join(f"{'round ' + str(r.round):>10}" for r in rows)]
    for c, name in enumerate(class_names):
        lines.append(f"{name:<{width}}" + "".join(f"{cell(r, c):>10}" for r in rows))
    return lines


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def _num(values: Sequence[float] | None, c: int) -> str:
    return "-" if values is None else f"{values[c]:.4f}"


def _prec(values: Sequence[float | None] | None, c: int) -> str:
    if not values or values[c] is None or (isinstance(values[c], float) and math.isnan(values[c])):
        return "-"
    return f"{100 * values[c]:.1f}"


# ---------------------------------------------------------------------------------------------
# Differences between two rounds


@dataclass(frozen=True)
class RoundDiff:
    """How labels moved from round ``a`` to round ``b`` over the images both rounds labelled.

    ``transitions`` is [C+1, C+1]: row = class in ``a``, column = class in ``b``, index C = not
    labelled (ignored pixel, or no matching box). Boxes match across rounds at IoU >= 0.5.
    """

    a: int
    b: int
    unit: str
    transitions: np.ndarray
    images: int
    only_a: int
    only_b: int

    def column(self, name: str) -> np.ndarray:
        """Per-class [C] counts: ``in_a``, ``in_b``, ``kept``, ``added``, ``dropped``, ``changed_out``, ``changed_in``."""
        t, c = self.transitions, self.transitions.shape[0] - 1
        kept = np.diag(t)[:c]
        columns = {
            "in_a": t[:c].sum(1), "in_b": t[:, :c].sum(0),
            "kept": kept, "added": t[c, :c], "dropped": t[:c, c],
            "changed_out": t[:c, :c].sum(1) - kept, "changed_in": t[:c, :c].sum(0) - kept,
        }
        return columns[name]


def diff_rounds(path: str | Path, a: int, b: int, *, iou: float = 0.5) -> RoundDiff:
    """Compare the pseudo-labels of rounds ``a`` and ``b`` of one run, image by image (matched by id)."""
    run = open_run(path)
    with open_round_of(run, a) as ra, open_round_of(run, b) as rb:
        if ra.task != rb.task:
            raise StoreError(f"rounds {a} and {b} hold different tasks ({ra.task}, {rb.task}); compare rounds of one run")
        common = [i for i in ra.image_ids if i in set(rb.image_ids)]
        num_classes = int(ra.meta["num_classes"])
        pairs = ((ra.index_of(i), rb.index_of(i)) for i in common)
        fn = _seg_transitions if ra.task == "segmentation" else _box_transitions
        transitions = fn(ra, rb, pairs, num_classes, iou)
        return RoundDiff(a=a, b=b, unit="pixels" if ra.task == "segmentation" else "boxes",
                         transitions=transitions.numpy(), images=len(common),
                         only_a=len(ra) - len(common), only_b=len(rb) - len(common))


def _seg_transitions(ra: RoundReader, rb: RoundReader, pairs, num_classes: int, iou: float) -> torch.Tensor:
    size = num_classes + 1
    total = torch.zeros(size * size, dtype=torch.int64)
    ignore_a, ignore_b = int(ra.meta["ignore_index"]), int(rb.meta["ignore_index"])
    for ia, ib in progress(list(pairs), desc="diff", unit="img"):
        la, lb = torch.from_numpy(ra.labels(ia).astype(np.int64)), torch.from_numpy(rb.labels(ib).astype(np.int64))
        if la.shape != lb.shape:
            raise StoreError(f"image {ra.image_ids[ia]!r} has labels of size {tuple(la.shape)} in round "
                             f"{ra.meta['round']} and {tuple(lb.shape)} in round {rb.meta['round']}; compare rounds of one run")
        la = torch.where(la == ignore_a, num_classes, la)
        lb = torch.where(lb == ignore_b, num_classes, lb)
        total += torch.bincount((la * size + lb).reshape(-1), minlength=size * size)
    return total.view(size, size)


def _box_transitions(ra: RoundReader, rb: RoundReader, pairs, num_classes: int, iou: float) -> torch.Tensor:
    from torchvision.ops import box_iou

    size = num_classes + 1
    total = torch.zeros(size, size, dtype=torch.int64)
    for ia, ib in pairs:
        da, db = ra.boxes(ia), rb.boxes(ib)
        la, lb = torch.from_numpy(da["labels"]) - 1, torch.from_numpy(db["labels"]) - 1
        overlap = box_iou(torch.from_numpy(da["boxes"]), torch.from_numpy(db["boxes"]))
        matched_a, matched_b = _greedy_match(overlap, iou)
        for i, j in zip(matched_a, matched_b):
            total[la[i], lb[j]] += 1
        for i in sorted(set(range(len(la))) - set(matched_a)):
            total[la[i], num_classes] += 1
        for j in sorted(set(range(len(lb))) - set(matched_b)):
            total[num_classes, lb[j]] += 1
    return total


def _greedy_match(overlap: torch.Tensor, threshold: float) -> tuple[list[int], list[int]]:
    """Pairs (i, j) taken in decreasing IoU, each box used once, IoU >= threshold."""
    if overlap.numel() == 0:
        return [], []
    order = torch.argsort(overlap.reshape(-1), descending=True).tolist()
    used_a: list[int] = []
    used_b: list[int] = []
    for k in order:
        i, j = divmod(k, overlap.shape[1])
        if float(overlap[i, j]) < threshold:
            break
        if i not in used_a and j not in used_b:
            used_a.append(i)
            used_b.append(j)
    return used_a, used_b


def format_diff(d: RoundDiff, class_names: Sequence[str]) -> str:
    """Per class: labels in each round, kept, added, dropped, changed to/from another class."""
    cols = ("in_a", "in_b", "kept", "added", "dropped", "changed_out", "changed_in")
    titles = (f"round {d.a}", f"round {d.b}", "kept", "added", "dropped", "to other", "from other")
    width = max(len(n) for n in class_names) + 2
    lines = [f"{d.unit} per class, {d.images} images in both rounds"
             + (f" ({d.only_a} only in round {d.a}, {d.only_b} only in round {d.b})" if d.only_a or d.only_b else ""),
             f"{'class':<{width}}" + "".join(f"{t:>14}" for t in titles)]
    values = [d.column(c) for c in cols]
    for k, name in enumerate(class_names):
        lines.append(f"{name:<{width}}" + "".join(f"{int(v[k]):>14}" for v in values))
    lines.append(f"{'total':<{width}}" + "".join(f"{int(v.sum()):>14}" for v in values))
    return "\n".join(lines)
