"""Callbacks: metrics files and the console report (plain objects with ``on_<event>`` methods)."""

from __future__ import annotations

import json
import logging
from typing import Any, Sequence

from .checkpoint import RunDir, writing
from .io import append_line, write_text_atomic
from .metrics import headline
from .types import RoundLabels

log = logging.getLogger("selftrain.report")


class CallbackBase:
    """No-op events; a callback overrides the ones it needs (the :class:`~selftrain.interfaces.Callback` protocol)."""

    def on_round_end(self, *, record: dict[str, Any], run_dir: RunDir, class_names: Sequence[str]) -> None:
        """After each round's record is complete."""

    def on_run_end(self, *, records: list[dict[str, Any]]) -> None:
        """After the last round."""


class MetricsWriter(CallbackBase):
    """Appends one JSON line per round to metrics.jsonl and writes eval/round_*.json.

    The line comes before the round's checkpoint: a line without one is dropped on ``--resume``
    (:meth:`selftrain.checkpoint.RunDir.prepare`), and the checkpoint carries the record too.
    """

    def on_round_end(self, *, record: dict[str, Any], run_dir: RunDir, class_names: Sequence[str]) -> None:
        if "eval" in record:
            evaluation = {"round": record["round"], "class_names": list(class_names), **record["eval"]}
            path = run_dir.eval(record["round"])
            with writing(path):
                write_text_atomic(path, json.dumps(evaluation, indent=2) + "\n")
        with writing(run_dir.metrics):
            append_line(run_dir.metrics, json.dumps(record))


class PlotWriter(CallbackBase):
    """Redraws ``<run>/plots/*.png`` from metrics.jsonl after every round (see :mod:`selftrain.plots`)."""

    def on_round_end(self, *, record: dict[str, Any], run_dir: RunDir, class_names: Sequence[str]) -> None:
        from .inspect import read_metrics
        from .plots import plot_run

        records = [r for _, r in sorted(read_metrics(run_dir).items())]
        with writing(run_dir.root / "plots"):
            plot_run(records, class_names, run_dir.root / "plots")


class TensorBoardWriter(CallbackBase):
    """TensorBoard event files beside metrics.jsonl: per round the score, per-class IoU, pseudo-label
    shares, thresholds and precision, and the mean losses. Built only when tensorboard is installed."""

    def __init__(self) -> None:
        self._writer = None

    @staticmethod
    def available() -> bool:
        import importlib.util

        return importlib.util.find_spec("tensorboard") is not None

    def on_round_end(self, *, record: dict[str, Any], run_dir: RunDir, class_names: Sequence[str]) -> None:
        with writing(run_dir.root):
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(run_dir.root))
            for tag, value in scalars(record, class_names).items():
                self._writer.add_scalar(tag, value, global_step=record["round"])
            self._writer.flush()

    def on_run_end(self, *, records: list[dict[str, Any]]) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def scalars(record: dict[str, Any], class_names: Sequence[str]) -> dict[str, float]:
    """The numbers of one round record under TensorBoard tags (``eval/miou``, ``pseudo/share/car``, ...)."""
    out = {f"loss/{name}": float(v) for name, v in record.get("losses", {}).items()}
    evaluation = record.get("eval") or {}
    for key in ("miou", "map", "accuracy"):
        if key in evaluation:
            out[f"eval/{key}"] = float(evaluation[key])
    per_class = evaluation.get("iou") or evaluation.get("ap") or []
    out.update({f"eval/class/{n}": float(v) for n, v in zip(class_names, per_class) if v is not None})
    if record.get("pseudo"):
        pseudo = RoundLabels.from_dict(record["pseudo"])
        total = max(sum(pseudo.selected), 1)
        if pseudo.selected_share is not None:
            out["pseudo/selected_share"] = float(pseudo.selected_share)
        out.update({f"pseudo/share/{n}": v / total for n, v in zip(class_names, pseudo.selected)})
        out.update({f"pseudo/threshold/{n}": float(t) for n, t in zip(class_names, pseudo.class_thresholds())})
        out.update({f"pseudo/precision/{n}": float(p) for n, p in zip(class_names, pseudo.precision or [])
                    if p is not None})
    return out


class ConsoleReport(CallbackBase):
    """Logs per round the target mIoU, the portion and the thresholds; a comparison table at the end."""

    def __init__(self) -> None:
        self.class_names: list[str] | None = None

    def on_round_end(self, *, record: dict[str, Any], run_dir: RunDir, class_names: Sequence[str]) -> None:
        self.class_names = list(class_names)
        log.info(format_round(record, class_names))

    def on_run_end(self, *, records: list[dict[str, Any]]) -> None:
        if len(records) > 1 and "eval" in records[0]:
            log.info(format_comparison(records, names=self.class_names))


def format_round(record: dict[str, Any], class_names: Sequence[str]) -> str:
    head = f"round {record['round']}"
    if "eval" in record:
        metric, value, _ = headline(record["eval"])
        head += f"  target {metric} {value:.1f}"
    if not record.get("pseudo"):
        return head + "  (source only)"
    pseudo = RoundLabels.from_dict(record["pseudo"])
    if pseudo.selected_share is not None:
        head += f"  portion {record['portion']:.2f}  selected {100 * pseudo.selected_share:.1f}% of pixels"
    else:
        head += f"  {sum(pseudo.selected)} labels stored (online)"
    rows = [f"  {'class':<14}{'threshold':>10}{'share %':>9}{'precision':>10}"]
    total = max(sum(pseudo.selected), 1)
    precision = pseudo.precision or [None] * len(class_names)
    thresholds = pseudo.class_thresholds()
    for c, name in enumerate(class_names):
        prec = "-" if precision[c] is None else f"{100 * precision[c]:.1f}"
        share = 100 * pseudo.selected[c] / total
        rows.append(f"  {name:<14}{thresholds[c]:>10.4f}{share:>9.2f}{prec:>10}")
    return "\n".join([head, *rows])


def format_comparison(records: list[dict[str, Any]], names: Sequence[str] | None) -> str:
    """Per-class IoU (or AP) of round 0 (source only) against the last round."""
    metric, first_value, first_class = headline(records[0]["eval"])
    last = records[-1]
    _, last_value, last_class = headline(last["eval"]) if "eval" in last else (metric, float("nan"), [None] * len(first_class))
    names = names or [f"class {i}" for i in range(len(first_class))]
    rows = [f"{'':<14}{'source only':>12}{'round ' + str(last['round']):>12}"]
    for c, name in enumerate(names):
        rows.append(f"{name:<14}{_fmt(first_class[c]):>12}{_fmt(last_class[c]):>12}")
    rows.append(f"{metric:<14}{first_value:>12.1f}{last_value:>12.1f}")
    return "\n".join(rows)


def format_eval(result: dict[str, Any], names: Sequence[str]) -> str:
    """Per-class IoU (AP) and mIoU (mAP) of one evaluation."""
    metric, value, per_class = headline(result)
    rows = [f"{name:<14}{_fmt(per_class[c]):>8}" for c, name in enumerate(names)]
    rows.append(f"{metric:<14}{value:>8.1f}")
    if "miou13" in result:
        rows.append(f"{'mIoU* (13)':<14}{result['miou13']:>8.1f}")
    return "\n".join(rows)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
