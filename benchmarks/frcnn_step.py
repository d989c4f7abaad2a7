"""Seconds per training step of tiny_frcnn (recipes/det_fog_source.yaml) against tiny_ssd (det_defaults).

A step is what the source phase does: forward_train on a batch of source images with their boxes,
backward, one AdamW step. "source+target" adds the forward of as many target images in train mode
(unlabelled RoIs: 128 random per image, the recipe's) and a weight-0 term on the last map, so the
backward also runs through the target graph, as a weight-0 alignment control does. Images are the
benchmark's own (synth_shapes source, synth_shapes_fog target) at the recipes' 128 x 128; both
detectors run in the same process, alternating, on the same batches.

Usage: python benchmarks/frcnn_step.py [--steps 20] [--batch 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402

from selftrain.adapters import create_adapter  # noqa: E402
from selftrain.data.detsets import build_det_dataset  # noqa: E402

DETECTORS = {"tiny_frcnn": {"size": 128, "width": 16, "norm": "group", "unlabelled_rois": {"n": 128, "mode": "random"}},
             "tiny_ssd": {"size": 128, "width": 64, "first_stride": 4}}  # the two recipes' options


def batches(batch: int, count: int):
    """``count`` (source images, targets, target images) triples from the benchmark's data sets."""
    source = build_det_dataset("synth_shapes", root=None, split="source", options={"num_images": batch * count})
    target = build_det_dataset("synth_shapes_fog", root=None, split="target_train",
                               options={"num_images": batch * count, "same_scenes": True}, with_labels=False)
    out = []
    for i in range(count):
        s = [source[j] for j in range(i * batch, (i + 1) * batch)]
        out.append(([x["image"] for x in s], [{"boxes": x["boxes"], "labels": x["labels"]} for x in s],
                    [target[j]["image"] for j in range(i * batch, (i + 1) * batch)]))
    return out


def one_step(adapter, optimizer, data, with_target: bool) -> float:
    images, targets, target_images = data
    start = time.perf_counter()
    loss = sum(adapter.forward_train(images, targets).losses.values())
    if with_target:
        out = adapter.forward_train(target_images)
        loss = loss + 0.0 * next(iter(out.features.values())).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per detector and mode")
    parser.add_argument("--batch", type=int, default=2, help="images per domain per step")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = batches(args.batch, args.steps + 2)
    models = {name: create_adapter(name, num_classes=6, **opts) for name, opts in DETECTORS.items()}
    optims = {name: torch.optim.AdamW(list(m.parameters()), lr=1e-4) for name, m in models.items()}
    times: dict[str, list[float]] = {f"{n}/{mode}": [] for n in models for mode in ("source", "source+target")}
    for i, d in enumerate(data):
        for name, model in models.items():
            for mode in ("source", "source+target"):
                t = one_step(model, optims[name], d, mode != "source")
                if i >= 2:  # two warm-up steps
                    times[f"{name}/{mode}"].append(t)
    median = {k: statistics.median(v) for k, v in times.items()}
    report = {"batch": args.batch, "threads": args.threads, "steps": args.steps, "median_s": median,
              "ratio_vs_tiny_ssd": {m: median[f"tiny_frcnn/{m}"] / median[f"tiny_ssd/{m}"]
                                    for m in ("source", "source+target")},
              "minutes_for_2000_3000": {k: [round(v * n / 60, 1) for n in (2000, 3000)] for k, v in median.items()}}
    for key, value in median.items():
        print(f"{key:28s} {value:.3f} s/step  2,000 steps: {value * 2000 / 60:.1f} min")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
