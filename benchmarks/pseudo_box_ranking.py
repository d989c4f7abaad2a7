"""Which criterion picks correct pseudo-boxes: the detection score or SRRS (Kim et al. 2019, Eq. 3)?

A detector of a finished run (its recipe and one round's checkpoint) labels the recipe's target
training images; every final detection is scored by its confidence and by SRRS at each ``delta``,
and judged against the target ground truth (VOC rules, IoU 0.5; reporting only, as in a run's
``precision``). Reported, as ratios against the score measured in the same run:

1. precision of the top-k boxes by SRRS over the precision of the top-k by score, for several k
   (SRRS ranks better when the ratio is above 1);
2. how many boxes the paper's thresholds keep and their precision: score >= 0.9 (Table 4 rows
   A, C, E) and SRRS >= 0.8 (rows B, D, F).

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
from selftrain.detection import srrs
from selftrain.metrics import box_hits


def score_boxes(run: Path, round_index: int | None, images: int, deltas: list[float], batch: int = 50):
    """Per final detection: score, SRRS at each delta and the VOC verdict (1, 0; -1 dropped)."""
    if not (run / "config.yaml").is_file():
        _fail(f"{run} holds no config.yaml; name the folder of a finished `selftrain run`")
    cfg = load_recipe(run / "config.yaml", ["device=cpu"])
    if cfg.task != "detection":
        _fail(f"{run} is a {cfg.task} run; this measures detection pseudo-boxes, name a detection run")
    path = run / "checkpoints" / (f"round_{round_index:03d}.pt" if round_index is not None else "last.pt")
    if not path.exists():
        _fail(f"checkpoint {path} does not exist; pick a round the run finished")
    adapter = build_adapter(cfg)
    adapter.load_state_dict(load_checkpoint(path)["model"])
    target, _ = build_target_dataset(cfg)
    n = min(images, len(target))
    scores, reliability, hits = [], {d: [] for d in deltas}, []
    for start in range(0, n, batch):
        index = range(start, min(start + batch, n))
        for i, p in zip(index, adapter.predict([target[i]["image"] for i in index])):
            hits.append(box_hits({"boxes": p.boxes, "scores": p.scores, "labels": p.labels},
                                 target.ground_truth(i), cfg.data.num_classes))
            scores.append(p.scores.numpy())
            for d in deltas:
                reliability[d].append(srrs(p.raw_boxes, p.raw_probs, p.boxes, p.labels, d).numpy())
    keep = np.concatenate(hits) >= 0
    correct = np.concatenate(hits)[keep] == 1
    return (np.concatenate(scores)[keep], {d: np.concatenate(v)[keep] for d, v in reliability.items()}, correct,
            {"images": n, "checkpoint": str(path)})


def top_k_precision(values: np.ndarray, correct: np.ndarray, k: int) -> float:
    order = np.argsort(-values, kind="stable")[:k]
    return float(correct[order].mean()) if len(order) else float("nan")


def at_threshold(values: np.ndarray, correct: np.ndarray, threshold: float) -> dict[str, float | int | None]:
    kept = values >= threshold
    return {"kept": int(kept.sum()), "precision": float(correct[kept].mean()) if kept.any() else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished detection run directory")
    parser.add_argument("--round", type=int, default=None, help="checkpoint round (default: last)")
    parser.add_argument("--images", type=int, default=200, help="target training images to label")
    parser.add_argument("--delta", type=float, nargs="+", default=[0.5], help="SRRS support IoU (paper: 0.5)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    score, reliability, correct, meta = score_boxes(args.run, args.round, args.images, args.delta)
    result = {**meta, "detections": len(score), "correct": int(correct.sum()),
              "score>=0.9": at_threshold(score, correct, 0.9), "top_k": {}}
    print(f"{meta['checkpoint']}: {len(score)} final detections on {meta['images']} target images, "
          f"{int(correct.sum())} correct")
    s = result["score>=0.9"]
    print(f"score >= 0.9 keeps {s['kept']} boxes, precision {_pct(s['precision'])}")
    for d, values in reliability.items():
        r = at_threshold(values, correct, 0.8)
        result[f"srrs(delta={d})>=0.8"] = r
        q = np.quantile(values, [0.5, 0.9, 0.99, 1.0]) if len(values) else [float("nan")] * 4
        r["quantiles"] = {"median": float(q[0]), "p90": float(q[1]), "p99": float(q[2]), "max": float(q[3])}
        print(f"SRRS (delta {d}) >= 0.8 keeps {r['kept']} boxes, precision {_pct(r['precision'])}; "
              f"SRRS median {q[0]:.2f}, 90th percentile {q[1]:.2f}, 99th {q[2]:.2f}, max {q[3]:.2f}")
    print(f"{'top k':>6} {'score':>7} " + " ".join(f"{'srrs d=' + str(d):>11} {'ratio':>6}" for d in reliability))
    for k in (25, 50, 100, 200, 400):
        if k > len(score):
            break
        base = top_k_precision(score, correct, k)
        row = {"score": base}
        cells = []
        for d, values in reliability.items():
            p = top_k_precision(values, correct, k)
            row[f"srrs(delta={d})"] = p
            cells.append(f"{_pct(p):>11} {p / base if base else float('nan'):>6.2f}")
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
