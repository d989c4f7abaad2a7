"""CBST threshold statistics: streaming histogram + exact refinement against collect-and-sort.

The baseline is the official code's approach as the paper describes it (CBST Algorithm 2): collect
the confidence of every pixel of every map per predicted class, sort each class, read the value at
rank floor(N_c * p). Both methods rank the same per-pixel costs ``-log p_max`` computed from the
logits (``predicted_cost_from_logits``), so their thresholds can be compared bit for bit.

Each method runs in a fresh child process over the same seeded random logit maps [C, H, W] (drawn
inside the process, outside the timed region: the streaming method reads them twice, as the
labeller reads its logit cache twice). Reported per size: seconds, peak resident memory over the
process's memory before the first map (``VmHWM - VmRSS``, the high-water mark reset where the
kernel allows), the ratios ours / baseline, and whether the thresholds are identical. Torch runs
one thread by default (``--threads``): on a shared 2-core machine a two-thread pool waits for busy
cores, and small reductions then take 100x longer, which measures the load rather than the methods.

    python benchmarks/thresholds.py                      # 40 and 400 maps of 19x256x512 (~3 min)
    python benchmarks/thresholds.py --maps 200 2000      # the full size (~12 min)
    python benchmarks/thresholds.py --prior              # CBST-SP: potentials weighted by a spatial prior
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from selftrain.policies import create_policy
from selftrain.policies import functional as F
from selftrain.priors import resize_prior
from selftrain.types import SegPrediction


def logit_map(index: int, classes: int, height: int, width: int) -> torch.Tensor:
    """Map ``index`` [1, C, H, W]: seeded noise plus a per-class offset so class sizes differ."""
    g = torch.Generator().manual_seed(index)
    offset = torch.linspace(1.5, -1.5, classes).view(1, classes, 1, 1)
    return torch.randn(1, classes, height, width, generator=g) * 3.0 + offset


def make_prior(classes: int, height: int, width: int) -> np.ndarray:
    """A smooth random spatial prior, each class summing to 1 over the image."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width]).reshape(2, 1, 1)
    q = np.stack([np.exp(-((y - rng.random()) ** 2 + (x - rng.random()) ** 2) / 0.1) for _ in range(classes)])
    q = q + 1e-3
    return (q / q.sum(axis=(1, 2), keepdims=True)).astype(np.float32)


def streaming(args, maps: int, prior: np.ndarray | None) -> tuple[float, list[float]]:
    """Ours: observe every map into the [C, BINS] histogram, then ``fit`` with refinement passes."""
    policy = create_policy("cbst_sp", prior=prior) if prior is not None else create_policy("cbst")
    drawing = 0.0

    def draw():
        nonlocal drawing
        for i in range(maps):
            start = time.perf_counter()
            z = logit_map(i, args.classes, args.height, args.width)
            drawing += time.perf_counter() - start
            yield SegPrediction(logits=z)

    start = time.perf_counter()
    for pred in draw():
        policy.observe(pred)
    policy.fit(args.portion, replay=draw)
    return time.perf_counter() - start - drawing, policy.costs.tolist()


def collect_and_sort(args, maps: int, prior: np.ndarray | None) -> tuple[float, list[float]]:
    """Baseline: every pixel's cost kept per class, sorted at the end, the rank read off."""
    log_q = None if prior is None else torch.log(resize_prior(prior, (args.height, args.width)))
    per_class: list[list[np.ndarray]] = [[] for _ in range(args.classes)]
    seconds = 0.0
    for i in range(maps):
        z = logit_map(i, args.classes, args.height, args.width)
        start = time.perf_counter()
        if log_q is None:
            label, cost = F.predicted_cost_from_logits(z)
        else:
            label, cost = F.predicted_cost(F.log_potentials(F.log_softmax_precise(z), log_q))
        label, cost = label.numpy().ravel(), cost.numpy().ravel()
        for c in range(args.classes):
            per_class[c].append(cost[label == c])
        seconds += time.perf_counter() - start
    start = time.perf_counter()
    costs = []
    for c in range(args.classes):
        values = np.sort(np.concatenate(per_class[c]))
        per_class[c] = []
        rank = math.floor(len(values) * args.portion)
        costs.append(0.0 if rank < 1 else float(values[rank - 1]))
    seconds += time.perf_counter() - start
    return seconds, costs


METHODS = {"ours": streaming, "baseline": collect_and_sort}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    """Reset the resident high-water mark to the current size (Linux >= 4.0); else it stays."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def child(args) -> None:
    """Run one method at one size in this (fresh) process; print seconds, peak MB and the costs."""
    torch.set_num_threads(args.threads)
    prior = make_prior(args.classes, args.height, args.width) if args.prior else None
    METHODS[args.child](args, 1, prior)  # warm-up: torch kernels, allocator, one-time caches
    _reset_peak()
    before = _status_kb("VmRSS")
    seconds, costs = METHODS[args.child](args, args.maps[0], prior)
    peak = (_status_kb("VmHWM") - before) / 1024
    print(json.dumps({"seconds": seconds, "peak_mb": peak, "costs": costs}))


def run_child(args, method: str, maps: int) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--maps", str(maps), "--classes", str(args.classes),
           "--height", str(args.height), "--width", str(args.width), "--portion", str(args.portion),
           "--threads", str(args.threads)] + (["--prior"] if args.prior else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maps", type=int, nargs="+", default=[40, 400])
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--portion", type=float, default=0.35)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prior", action="store_true", help="CBST-SP: prior-weighted potentials")
    parser.add_argument("--child", choices=sorted(METHODS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    print(f"{'cbst_sp' if args.prior else 'cbst'} thresholds, maps of {args.classes}x{args.height}x{args.width}, "
          f"portion {args.portion}, {args.threads} threads")
    reports = []
    for maps in args.maps:
        ours, base = run_child(args, "ours", maps), run_child(args, "baseline", maps)
        report = {
            "maps": maps, "identical": ours["costs"] == base["costs"],
            "seconds": {"ours": ours["seconds"], "baseline": base["seconds"],
                        "ratio": ours["seconds"] / base["seconds"]},
            "peak_mb": {"ours": ours["peak_mb"], "baseline": base["peak_mb"],
                        "ratio": ours["peak_mb"] / max(base["peak_mb"], 1e-3)},
        }
        reports.append(report)
        print(f"{maps:6d} maps  time {report['seconds']['ours']:8.2f} s vs {report['seconds']['baseline']:8.2f} s "
              f"(ratio {report['seconds']['ratio']:.3f})  peak {report['peak_mb']['ours']:8.1f} MB vs "
              f"{report['peak_mb']['baseline']:8.1f} MB (ratio {report['peak_mb']['ratio']:.4f})  "
              f"thresholds identical: {report['identical']}")
    print(json.dumps(reports))


if __name__ == "__main__":
    main()
