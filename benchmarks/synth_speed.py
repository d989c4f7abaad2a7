"""Time the synthetic benchmark renderer on one core: 1000 images at 128x256 (target: < 30 s).

Usage: python benchmarks/synth_speed.py [--num 1000] [--height 128] [--width 256]
"""

from __future__ import annotations

import argparse
import os
import time

# Pin BLAS/OpenMP pools before numpy/scipy load so the timing is single-threaded.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402

from selftrain.data import synth  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    for i in range(args.num):
        split = synth.SPLITS[i % len(synth.SPLITS)]  # mix both rendering styles
        synth.render(split, i, height=args.height, width=args.width)
    total = time.perf_counter() - start
    print(f"rendered {args.num} images of {args.height}x{args.width} in {total:.2f} s "
          f"({args.num / total:.1f} images/s, single thread)")


if __name__ == "__main__":
    main()
