"""The embedded demos, per seed, every policy starting from the same source model.

- segmentation: source only, then ST, CBST and CBST-SP on the synthetic street scenes; every seed
  re-generates the benchmark, trains the source model once and builds the spatial prior from that
  seed's source labels.
- detection: source only, then naive ST, WST, WST's weak-mask ablation (Table 4 row E) and the
  mean teacher on the synthetic photo -> clipart shapes benchmark.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .build import build_engine
from .config import load_recipe
from .io import write_text_atomic
from .priorbuild import build_prior_command
from .types import RoundLabels

log = logging.getLogger(__name__)
POLICIES = ("st", "cbst", "cbst_sp")
DETECTION_RECIPES = {"det_st": "det_st.yaml", "wst": "det_wst.yaml", "wst_weak_mask": "det_wst_weak_mask.yaml",
                     "mean_teacher": "det_mean_teacher.yaml"}


def run_demo(*, out: Path, seeds: Sequence[int], recipes_dir: Path, overrides: Sequence[str],
             resume: bool, task: str = "segmentation") -> str:
    """Run every seed; write summary.json and summary.md under ``out``; return the summary text."""
    if task == "detection":
        return run_detection_demo(out=out, seeds=seeds, recipes_dir=recipes_dir, overrides=overrides, resume=resume)
    results = [_run_seed(out / f"seed_{s}", s, recipes_dir, list(overrides), resume) for s in seeds]
    summary = summarise(results)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    text = format_summary(summary)
    write_text_atomic(out / "summary.md", text + "\n")
    return text


def _run_seed(root: Path, seed: int, recipes_dir: Path, overrides: list[str], resume: bool) -> dict[str, Any]:
    common = seed_overrides(seed, overrides)
    runs = {"source_only": _run(recipes_dir / "synth_source.yaml", common + ["rounds.count=0"], root / "source_only",
                                resume)}
    prior = root / "prior_synth_street.npz"
    if not prior.exists():
        build_prior_command(dataset=str(recipes_dir / "synth_source.yaml"), root=None, split="", options=(),
                            num_classes=None, out=str(prior), size=None, ksize=None, plot=True,
                            command=f"selftrain demo (seed {seed})", overrides=common)
    start = [f"model.checkpoint={root / 'source_only' / 'checkpoints' / 'round_000.pt'}",
             "source_training.enabled=false"]
    for name in POLICIES:
        extra = [f"policy.prior={prior}"] if name.endswith("_sp") else []
        runs[name] = _run(recipes_dir / f"synth_{name}.yaml", common + start + extra, root / name, resume)
    cfg = load_recipe(recipes_dir / "synth_source.yaml", common)
    return {"seed": seed, "runs": runs, "class_names": cfg.data.class_names, "rare_classes": rarest_classes(cfg)}


def run_detection_demo(*, out: Path, seeds: Sequence[int], recipes_dir: Path, overrides: Sequence[str],
                       resume: bool) -> str:
    """Source only, naive ST, WST and mean teacher per seed; a mAP table over seeds."""
    rows = []
    for seed in seeds:
        root = out / f"seed_{seed}"
        common = seed_overrides(seed, overrides)
        runs = {"source_only": _run(recipes_dir / "det_source.yaml", common + ["rounds.count=0"],
                                    root / "source_only", resume)}
        start = [f"model.checkpoint={root / 'source_only' / 'checkpoints' / 'round_000.pt'}",
                 "source_training.enabled=false"]
        for name, recipe in DETECTION_RECIPES.items():
            runs[name] = _run(recipes_dir / recipe, common + start, root / name, resume)
        rows += [{"seed": seed, "method": m, "map_per_round": [r["eval"]["map"] for r in recs if "eval" in r],
                  "boxes_per_round": [sum(RoundLabels.from_dict(r["pseudo"]).selected) for r in recs if "pseudo" in r],
                  "precision_per_round": [r["pseudo"].get("precision_overall") for r in recs if "pseudo" in r]}
                 for m, recs in runs.items()]
    summary = {"rows": rows}
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    text = format_detection_summary(summary)
    write_text_atomic(out / "summary.md", text + "\n")
    return text


def format_detection_summary(summary: dict[str, Any]) -> str:
    """Per seed: target-val mAP after each round (round 0 = the shared source model) and the pseudo-boxes
    the last round stored with their precision; then means over seeds."""
    lines = ["target-val mAP (VOC, IoU 0.5) per round; round 0 is the source model; boxes: pseudo-boxes the",
             "last round stored for the target training images, prec: their precision (IoU 0.5, same class)",
             f"{'seed':<6}{'method':<14}{'rounds':<26}{'last':>7}{'gain':>7}{'boxes':>7}{'prec %':>8}"]
    base = {r["seed"]: r["map_per_round"][0] for r in summary["rows"] if r["method"] == "source_only"}
    for r in summary["rows"]:
        per_round = " ".join(f"{v:.1f}" for v in r["map_per_round"])
        boxes, prec = _last_labels(r)
        lines.append(f"{r['seed']:<6}{r['method']:<14}{per_round:<26}{r['map_per_round'][-1]:>7.1f}"
                     f"{r['map_per_round'][-1] - base[r['seed']]:>+7.1f}{_num(boxes, '.0f'):>7}{_num(prec, '.1f'):>8}")
    lines += ["", "mean over seeds", f"{'method':<14}{'mAP':>7}{'gain':>7}{'boxes':>7}{'prec %':>8}"]
    for method in ("source_only", *DETECTION_RECIPES):
        rows = [r for r in summary["rows"] if r["method"] == method]
        if rows:
            last = [r["map_per_round"][-1] for r in rows]
            gain = [r["map_per_round"][-1] - base[r["seed"]] for r in rows]
            boxes, prec = zip(*(_last_labels(r) for r in rows))
            lines.append(f"{method:<14}{_mean(last):>7.1f}{_mean(gain):>+7.1f}{_num(_mean(boxes), '.0f'):>7}"
                         f"{_num(_mean(prec), '.1f'):>8}")
    return "\n".join(lines)


def _last_labels(row: dict[str, Any]) -> tuple[float | None, float | None]:
    """Pseudo-boxes of the last round and their precision in %, None where there are none."""
    boxes, prec = row.get("boxes_per_round") or [None], row.get("precision_per_round") or [None]
    return boxes[-1], None if prec[-1] is None else 100.0 * prec[-1]


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def seed_overrides(seed: int, overrides: Sequence[str]) -> list[str]:
    """The run seed and the benchmark's seed for every split, then the user's overrides."""
    return [f"seed={seed}", *(f"data.{k}.options.seed={seed}" for k in ("source", "target", "target_val")),
            *overrides]


def _run(recipe: Path, overrides: list[str], out: Path, resume: bool) -> list[dict[str, Any]]:
    log.info("== %s -> %s", recipe.name, out)
    cfg = load_recipe(recipe, overrides)
    finished = (out / "checkpoints" / f"round_{cfg.rounds.count:03d}.pt").exists()
    return build_engine(cfg, out).run(resume=resume or finished)  # a finished sub-run is reused


def rarest_classes(cfg, k: int = 3) -> list[int]:
    """The k classes with the fewest pixels in the target val ground truth."""
    from .build import build_data

    val = build_data(cfg).target_val
    counts = np.zeros(cfg.data.num_classes, dtype=np.int64)
    for i in range(len(val)):
        gt = val.ground_truth(i)
        counts += np.bincount(gt[gt < cfg.data.num_classes].ravel(), minlength=cfg.data.num_classes)
    return [int(c) for c in np.argsort(counts, kind="stable")[:k]]


def _mean(values: Sequence[float | None]) -> float:
    return float(np.mean([v for v in values if v is not None])) if any(v is not None for v in values) else float("nan")


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per seed and method: mIoU per round, rare-class mean IoU, pseudo-label class shares."""
    rows = []
    for res in results:
        rare = res["rare_classes"]
        for method, records in res["runs"].items():
            recs = [r for r in records if "eval" in r]
            if method != "source_only":
                recs = recs[1:]  # round 0 is the shared source model
            last = recs[-1]
            rows.append({
                "seed": res["seed"], "method": method,
                "miou_per_round": [r["eval"]["miou"] for r in recs],
                "miou": last["eval"]["miou"], "rare_miou": _mean([last["eval"]["iou"][c] for c in rare]),
                "pseudo_share_round1": _shares(records),
            })
    return {"class_names": results[0]["class_names"], "rare_classes": results[0]["rare_classes"], "rows": rows}


def _shares(records: list[dict[str, Any]]) -> list[float] | None:
    for r in records:
        if "pseudo" in r:
            sel = RoundLabels.from_dict(r["pseudo"]).selected
            return [100.0 * v / max(sum(sel), 1) for v in sel]
    return None


def format_summary(summary: dict[str, Any]) -> str:
    names, rare = summary["class_names"], summary["rare_classes"]
    lines = [f"target-val mIoU per round (rare classes: {', '.join(names[c] for c in rare)})",
             f"{'seed':<6}{'method':<13}{'rounds':<26}{'last':>7}{'rare3':>7}{'gain':>7}"]
    base = {r["seed"]: r["miou"] for r in summary["rows"] if r["method"] == "source_only"}
    for r in summary["rows"]:
        per_round = " ".join(f"{v:.1f}" for v in r["miou_per_round"])
        gain = r["miou"] - base[r["seed"]]
        lines.append(f"{r['seed']:<6}{r['method']:<13}{per_round:<26}{r['miou']:>7.1f}{r['rare_miou']:>7.1f}{gain:>+7.1f}")
    lines += ["", "mean over seeds", f"{'method':<13}{'mIoU':>7}{'rare3':>7}{'gain':>7}"]
    for method in ("source_only", *POLICIES):
        rows = [r for r in summary["rows"] if r["method"] == method]
        if rows:
            gain = _mean([r["miou"] - base[r["seed"]] for r in rows])
            lines.append(f"{method:<13}{_mean([r['miou'] for r in rows]):>7.1f}"
                         f"{_mean([r['rare_miou'] for r in rows]):>7.1f}{gain:>+7.1f}")
    lines += ["", "round-1 pseudo-label share per class (% of selected pixels, first seed)",
              f"{'class':<14}" + "".join(f"{m:>9}" for m in POLICIES)]
    first = {r["method"]: r for r in summary["rows"] if r["seed"] == summary["rows"][0]["seed"]}
    for c, name in enumerate(names):
        lines.append(f"{name:<14}" + "".join(f"{first[m]['pseudo_share_round1'][c]:>9.2f}" for m in POLICIES if m in first))
    return "\n".join(lines)
