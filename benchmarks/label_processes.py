"""Offline labelling (CBST) in one process against two processes under torchrun (gloo), as a ratio
measured in the same run: images per second of the whole round (start-up of the processes excluded;
shards, summed statistics, shard files and rank 0's merge included).

One process gets every thread of the machine; each of two processes gets half of them, so the
ratio says what sharding buys over intra-op threads on the same cores (on GPUs each process has
its own device and the ratio approaches the number of processes).

    python benchmarks/label_processes.py [--images 64] [--height 128] [--width 256] [--batch 4]
        [--model smp_deeplabv3plus]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODEL_OPTIONS = {
    "smp_deeplabv3plus": {"encoder": "resnet50"},
    "smp_unet": {"encoder": "resnet18", "decoder_channels": [128, 64, 32, 16, 16]},
    "tiny_seg": {},
}


def worker(args) -> None:
    """One process's part: build, wait for the others, label the round, report the seconds."""
    from selftrain import dist
    from selftrain.adapters import create_adapter
    from selftrain.data.datasets import SynthStreet
    from selftrain.data.synth import CLASS_NAMES
    from selftrain.phases import RunData
    from selftrain.policies import create_policy
    from selftrain.pseudo import label_round
    from selftrain.store import RoundMeta
    from selftrain.tasks import SegmentationTask

    dist.init_from_env("cpu")
    torch.manual_seed(0)
    names = list(CLASS_NAMES)
    adapter = create_adapter(args.model, num_classes=len(names), **MODEL_OPTIONS[args.model])
    data = SynthStreet(split="target_train", num_images=args.images, height=args.height, width=args.width,
                       with_labels=False, cache=False)
    run = RunData(source=data, target=data, target_val=None, num_classes=len(names), class_names=names,
                  pseudo_batch=args.batch)
    task, policy = SegmentationTask(run), create_policy("cbst")
    meta = RoundMeta(task="segmentation", round=1, policy="cbst", portion=0.2, num_classes=len(names),
                     class_names=names)
    dist.barrier()
    start = time.perf_counter()
    label_round(task.labeller(policy, portion=0.2, progress=1.0, device="cpu"),
                lambda part, scratch: task.predictions(adapter, part, scratch, device="cpu", offline=True),
                task.sink, dataset=data, batch_size=args.batch, meta=meta, path=Path(args.out) / "round_001.h5")
    seconds = time.perf_counter() - start
    if dist.is_main():
        print(json.dumps({"seconds": seconds}))


def timed(args, processes: int) -> float:
    threads = max(1, (os.cpu_count() or 1) // processes)
    with tempfile.TemporaryDirectory() as out:
        launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone",
                                              f"--nproc_per_node={processes}"]
        cmd = [sys.executable, *launcher, __file__, "--worker", "--out", out, "--images", str(args.images),
               "--height", str(args.height), "--width", str(args.width), "--batch", str(args.batch),
               "--model", args.model]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "SELFTRAIN_QUIET": "1"}
        done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--model", default="smp_deeplabv3plus", choices=sorted(MODEL_OPTIONS))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    one, two = timed(args, 1), timed(args, 2)
    print(f"model {args.model}, {args.images} target images of {args.height}x{args.width}, batch {args.batch}, "
          f"{os.cpu_count()} cores")
    print(f"1 process   {one:8.2f} s  {args.images / one:7.2f} images/s")
    print(f"2 processes {two:8.2f} s  {args.images / two:7.2f} images/s   throughput ratio {one / two:.2f}")


if __name__ == "__main__":
    main()
