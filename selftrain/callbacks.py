"""Callbacks: metrics files and the console report (plain objects with ``on_<event>`` methods)."""

from __future__ import annotations

import json
import logging
from typing import Any, Sequence

from .checkpoint import RunDir
from .io import append_line, write_text_atomic

log = logging.getLogger("selftrain.report")


class MetricsWriter:
    """Appends one JSON line per round to metrics.jsonl and writes eval/round_*.json."""

    def on_round_end(self, *, record: dict[str, Any], run_dir: RunDir, class_names: Sequence[str]) -> None:
        if "eval" in record:
            evaluation = {"round": record["round"], "class_names": list(class_names), **record["eval"]}
            write_text_atomic(run_dir.eval(record["round"]), json.dumps(evaluation, indent=2) + "\n")
        append_line(run_dir.metrics, json.dumps(record))


class ConsoleReport:
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
        head += f"  target mIoU {record['eval']['miou']:.1f}"
    pseudo = record.get("pseudo")
    if not pseudo:
        return head + "  (source only)"
    head += f"  portion {record['portion']:.2f}  selected {100 * pseudo['selected_share']:.1f}% of pixels"
    rows = [f"  {'class':<14}{'threshold':>10}{'share %':>9}{'precision':>10}"]
    total = max(sum(pseudo["selected_pixels"]), 1)
    precision = pseudo.get("precision") or [None] * len(class_names)
    for c, name in enumerate(class_names):
        prec = "-" if precision[c] is None else f"{100 * precision[c]:.1f}"
        share = 100 * pseudo["selected_pixels"][c] / total
        rows.append(f"  {name:<14}{pseudo['thresholds'][c]:>10.4f}{share:>9.2f}{prec:>10}")
    return "\n".join([head, *rows])


def format_comparison(records: list[dict[str, Any]], names: Sequence[str] | None) -> str:
    """Per-class IoU of round 0 (source only) against the last round."""
    first, last = records[0], records[-1]
    names = names or [f"class {i}" for i in range(len(first["eval"]["iou"]))]
    rows = [f"{'':<14}{'source only':>12}{'round ' + str(last['round']):>12}"]
    for c, name in enumerate(names):
        rows.append(f"{name:<14}{_fmt(first['eval']['iou'][c]):>12}{_fmt(last['eval']['iou'][c]):>12}")
    rows.append(f"{'mIoU':<14}{first['eval']['miou']:>12.1f}{last['eval']['miou']:>12.1f}")
    return "\n".join(rows)


def format_eval(result: dict[str, Any], names: Sequence[str]) -> str:
    """Per-class IoU and mIoU of one evaluation."""
    rows = [f"{name:<14}{_fmt(result['iou'][c]):>8}" for c, name in enumerate(names)]
    rows.append(f"{'mIoU':<14}{result['miou']:>8.1f}")
    return "\n".join(rows)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
