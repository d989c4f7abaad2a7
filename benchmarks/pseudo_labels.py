"""Pseudo-label generation cost, as ratios against baselines measured in the same run.

1. Time: ``label_target`` (pass 1 with statistics and the float16 logit cache, fit, pass 2 with
   selection and the HDF5 file) divided by one bare inference pass over the same target images.
   Goal: <= 1.15.
2. Memory: peak resident memory of a child process that labels 100 target images against one that
   labels 2,000 (the same model and image size). Goal: the two within 100 MB.

    python benchmarks/pseudo_labels.py [--images 400] [--height 64] [--width 128] [--model smp_unet]
    python benchmarks/pseudo_labels.py --model deeplabv2 --images 16 --height 512 --width 1024 --batch 2 \
        --repeats 1 --skip-memory
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from selftrain.adapters import create_adapter
from selftrain.data.datasets import SynthStreet
from selftrain.data.synth import CLASS_NAMES
from selftrain.policies import create_policy
from selftrain.pseudo import label_target
from selftrain.store import PseudoLabelWriter, RoundMeta
from selftrain.training import collate

MODEL_OPTIONS = {
    "smp_unet": {"encoder": "resnet18", "decoder_channels": [128, 64, 32, 16, 16], "channels_last": True},
    "smp_deeplabv3plus": {"encoder": "resnet50", "channels_last": True},
    "tiny_seg": {},
    "deeplabv2": {"depth": 101},  # the paper recipes' segmenter (random weights: the cost is the same)
}


def calibrated(adapter, num_classes: int, size: tuple[int, int]):
    """Random weights, with the score layers rescaled so the logits spread like a trained model's
    (std ~2): a random DeepLab-v2 R101 reaches |z| ~ 1e5, a one-hot softmax no trained model gives."""
    scores = [m for m in adapter.model.modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels == num_classes]
    with torch.no_grad():
        z = adapter.native_logits(torch.randn(1, 3, *size, device=next(adapter.model.parameters()).device))
        for m in scores:
            m.weight *= 2.0 / max(float(z.std()), 1e-6)
            if m.bias is not None:
                m.bias.zero_()
    return adapter


def setup(args):
    torch.manual_seed(0)
    adapter = create_adapter(args.model, num_classes=len(CLASS_NAMES), **MODEL_OPTIONS[args.model]).to(args.device)
    if args.model == "deeplabv2":
        calibrated(adapter, len(CLASS_NAMES), (args.height // 4, args.width // 4))
    # Rendered on the fly (no cache, so memory cannot grow with the set) and wrapped so that the
    # optional pseudo-label precision against target ground truth is not part of the measurement.
    data = SynthStreet(split="target_train", num_images=args.images, height=args.height, width=args.width,
                       with_labels=False, cache=False)
    return adapter, Subset(data, range(len(data)))


def bare_pass(adapter, data, batch: int, device: str) -> float:
    """Load, predict and take the argmax on the host: the least any labelling pass must do."""
    start = time.perf_counter()
    for b in DataLoader(data, batch_size=batch, collate_fn=collate):
        adapter.predict(b["image"].to(device)).logits.argmax(1).cpu()
    return time.perf_counter() - start


def labelling_pass(adapter, data, batch: int, folder: Path, device: str) -> float:
    writer = PseudoLabelWriter(folder / "round_001.h5", RoundMeta(task="segmentation", round=1, policy="cbst",
                                                                  portion=0.2, num_classes=len(CLASS_NAMES),
                                                                  class_names=list(CLASS_NAMES)))
    start = time.perf_counter()
    with writer:
        label_target(adapter=adapter, policy=create_policy("cbst"), dataset=data, portion=0.2, writer=writer,
                     scratch=folder / "logits.tmp", batch_size=batch, device=torch.device(device), ignore_index=255)
    return time.perf_counter() - start


def child(args) -> None:
    """Label ``args.images`` images and print the peak RSS in MB (run in a fresh process)."""
    adapter, data = setup(args)
    with tempfile.TemporaryDirectory() as tmp:
        labelling_pass(adapter, data, args.batch, Path(tmp), args.device)
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def peak_rss(args, images: int) -> float:
    cmd = [sys.executable, __file__, "--child", "--images", str(images), "--height", str(args.height),
           "--width", str(args.width), "--model", args.model, "--batch", str(args.batch), "--device", args.device]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--model", default="smp_unet", choices=sorted(MODEL_OPTIONS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes of each kind (the fastest counts)")
    args = parser.parse_args()
    if args.child:
        return child(args)
    adapter, data = setup(args)
    bare_pass(adapter, data, args.batch, args.device)  # warm-up: allocator, oneDNN / cuDNN kernels
    with tempfile.TemporaryDirectory() as tmp:
        bare = min(bare_pass(adapter, data, args.batch, args.device) for _ in range(args.repeats))
        full = min(labelling_pass(adapter, data, args.batch, Path(tmp), args.device) for _ in range(args.repeats))
    print(f"model {args.model} on {args.device}, {args.images} target images of {args.height}x{args.width}, "
          f"batch {args.batch}")
    print(f"bare inference pass     {bare:8.2f} s")
    print(f"pseudo-label generation {full:8.2f} s   ratio {full / bare:.3f}  (goal <= 1.15)")
    if not args.skip_memory:
        small, large = peak_rss(args, 100), peak_rss(args, 2000)
        print(f"peak RSS, 100 images    {small:8.1f} MB")
        print(f"peak RSS, 2000 images   {large:8.1f} MB   difference {large - small:+.1f} MB  (goal: within 100 MB)")


if __name__ == "__main__":
    main()
