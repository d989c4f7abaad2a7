"""Which criterion picks correct pseudo-boxes: the detection score or SRRS (Kim et al. 2019, Eq. 3)?

A detector of a finished run (its recipe and one round's checkpoint) labels the recipe's target
training images; every final detection is scored by its confidence and by SRRS under both readings
of Algorithm 1's supporting regions (``srrs_candidates``: ``per_class``, the class-c* candidates of
the model's per-class pre-NMS lists; ``any_class``, every raw candidate whose best foreground
probability is >= 0.01) at each ``delta``, and judged against the target ground truth (VOC rules,
IoU 0.5; reporting only, as in a run's ``precision``). Reported, against the score measured in the
same run:

1. the SRRS distribution of the final detections and the number of supporting regions N_s;
2. how many boxes the paper's thresholds keep and their precision: score >= 0.9 (Table 4 rows
   A, C, E) and SRRS >= 0.8 (rows B, D, F), and the precision of as many boxes taken by score
   (the same count);
3. precision of the top-k boxes by each SRRS reading over the precision of the top-k by score,
   for several k (SRRS ranks better when the ratio is above 1).

    python benchmarks/pseudo_box_ranking.py RUN [--round N] [--images 200] [--delta 0.5 0.7]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from selftrain.build import build_adapter, build_target_dataset
from selftrain.checkpoint import load_checkpoint
from selftrain.config import load_recipe
from selftrain.detection import SRRS_CANDIDATES, box_iou, srrs, srrs_per_class
from selftrain.metrics import box_hits
from selftrain.types import DetPrediction


def reading_srrs(pred: DetPrediction, reading: str, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """SRRS of every final detection under one reading and its number of supporting regions. -> [M], [M]"""
    if reading == "per_class":
        c = pred.class_candidates
        values = srrs_per_class(c["boxes"], c["scores"], c["labels"], pred.boxes, pred.labels, delta)
        support = (box_iou(pred.boxes, c["boxes"]) >= delta) & (c["labels"][None] == pred.labels[:, None])
    else:
        values = srrs(pred.raw_boxes, pred.raw_probs, pred.boxes, pred.labels, delta)
        support = box_iou(pred.boxes, pred.raw_boxes) >= delta
    return values.numpy(), support.sum(1).numpy()


def score_boxes(run: Path, round_index: int | None, images: int, deltas: list[float], batch: int = 50):
    """Per final detection: score, SRRS and N_s per (reading, delta), and the VOC verdict (1, 0; -1 dropped)."""
    if not (run / "config.yaml").is_file():
        _fail(f"{run} holds no config.yaml; name the folder of a finished `selftrain run`")
    # per_class predictions carry both readings' candidates (raw_boxes/raw_probs are always there)
    cfg = load_recipe(run / "config.yaml", ["device=cpu", "model.options.srrs_candidates=per_class"])
    if cfg.task != "detection":
        _fail(f"{run} is a {cfg.task} run; this measures detection pseudo-boxes, name a detection run")
    path = run / "checkpoints" / (f"round_{round_index:03d}.pt" if round_index is not None else "last.pt")
    if not path.exists():
        _fail(f"checkpoint {path} does not exist; pick a round the run finished")
    adapter = build_adapter(cfg)
    adapter.load_state_dict(load_checkpoint(path)["model"])
    target, _ = build_target_dataset(cfg)
    n = min(images, len(target))
    keys = [(r, d) for r in SRRS_CANDIDATES for d in deltas]
    scores, hits = [], []
    reliability, support = {k: [] for k in keys}, {k: [] for k in keys}
    for start in range(0, n, batch):
        index = range(start, min(start + batch, n))
        for i, p in zip(index, adapter.predict([target[i]["image"] for i in index])):
            hits.append(box_hits({"boxes": p.boxes, "scores": p.scores, "labels": p.labels},
                                 target.ground_truth(i), cfg.data.num_classes))
            scores.append(p.scores.numpy())
            for k in keys:
                values, count = reading_srrs(p, *k)
                reliability[k].append(values)
                support[k].append(count)
    keep = np.concatenate(hits) >= 0
    correct = np.concatenate(hits)[keep] == 1
    cat = lambda d: {k: np.concatenate(v)[keep] for k, v in d.items()}  # noqa: E731
    return (np.concatenate(scores)[keep], cat(reliability), cat(support), correct,
            {"images": n, "checkpoint": str(path)})


def top_k_precision(values: np.ndarray, correct: np.ndarray, k: int) -> float:
    order = np.argsort(-values, kind="stable")[:k]
    return float(correct[order].mean()) if len(order) else float("nan")


def at_threshold(values: np.ndarray, correct: np.ndarray, threshold: float) -> dict[str, float | int | None]:
    kept = values >= threshold
    return {"kept": int(kept.sum()), "precision": float(correct[kept].mean()) if kept.any() else None}


def distribution(values: np.ndarray) -> dict[str, float]:
    q = np.quantile(values, [0.5, 0.9, 0.99, 1.0]) if len(values) else [float("nan")] * 4
    return {"median": float(q[0]), "p90": float(q[1]), "p99": float(q[2]), "max": float(q[3])}


def name(reading: str, delta: float) -> str:
    return f"srrs_{reading}(delta={delta})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished detection run directory")
    parser.add_argument("--round", type=int, default=None, help="checkpoint round (default: last)")
    parser.add_argument("--images", type=int, default=200, help="target training images to label")
    parser.add_argument("--delta", type=float, nargs="+", default=[0.5], help="SRRS support IoU (paper: 0.5)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    score, reliability, support, correct, meta = score_boxes(args.run, args.round, args.images, args.delta)
    result = {**meta, "detections": len(score), "correct": int(correct.sum()),
              "score>=0.9": at_threshold(score, correct, 0.9), "top_k": {}}
    print(f"{meta['checkpoint']}: {len(score)} final detections on {meta['images']} target images, "
          f"{int(correct.sum())} correct")
    s = result["score>=0.9"]
    print(f"score >= 0.9 keeps {s['kept']} boxes, precision {_pct(s['precision'])}")
    for (reading, d), values in reliability.items():
        r = at_threshold(values, correct, 0.8)
        r["score_same_count"] = top_k_precision(score, correct, r["kept"]) if r["kept"] else None
        r["quantiles"] = q = distribution(values)
        r["support"] = distribution(support[reading, d].astype(np.float64))
        result[f"{name(reading, d)}>=0.8"] = r
        print(f"SRRS {reading:<9} (delta {d}) >= 0.8 keeps {r['kept']} boxes, precision {_pct(r['precision'])} "
              f"(top {r['kept']} by score: {_pct(r['score_same_count'])}); SRRS median {q['median']:.2f}, "
              f"90th percentile {q['p90']:.2f}, 99th {q['p99']:.2f}, max {q['max']:.2f}; "
              f"supporting regions median {r['support']['median']:.0f}")
    print(f"{'top k':>6} {'score':>7} " + " ".join(f"{name(*k):>28} {'ratio':>6}" for k in reliability))
    for k in (25, 50, 100, 200, 400):
        if k > len(score):
            break
        base = top_k_precision(score, correct, k)
        row = {"score": base}
        cells = []
        for key, values in reliability.items():
            p = top_k_precision(values, correct, k)
            row[name(*key)] = p
            cells.append(f"{_pct(p):>28} {p / base if base else float('nan'):>6.2f}")
        result["top_k"][k] = row
        print(f"{k:>6} {_pct(base):>7} " + " ".join(cells))
    print(json.dumps(result))


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


if __name__ == "__main__":
    main()
