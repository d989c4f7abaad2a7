"""How much of a round file's HDF5 writing a second thread could hide: writing alone, a torch
workload alone, and both at once (the write in a thread), measured side by side in one run.

    python benchmarks/hdf5_overlap.py [--images 8] [--height 512] [--width 1024]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import torch


def write(path: Path, labels: np.ndarray, conf: np.ndarray) -> None:
    """The round file's layout: one gzip-1 chunk per image, labels uint8 and confidences float16."""
    n, h, w = labels.shape
    with h5py.File(path, "w") as f:
        sets = [f.create_dataset(name, shape=(0, h, w), maxshape=(None, h, w), dtype=a.dtype, chunks=(1, h, w),
                                 compression="gzip", compression_opts=1) for name, a in (("labels", labels),
                                                                                          ("confidence", conf))]
        for k in range(n):
            for dataset, array in zip(sets, (labels, conf)):
                dataset.resize(k + 1, axis=0)
                dataset[k] = array[k]


def compute(steps: int = 400) -> None:
    a = torch.randn(256, 256)
    for _ in range(steps):
        (a @ a).sin()


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=1024)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    shape = (args.images, args.height, args.width)
    labels, conf = rng.integers(0, 19, shape).astype(np.uint8), rng.random(shape).astype(np.float16)
    with tempfile.TemporaryDirectory() as tmp:
        alone = seconds(lambda: write(Path(tmp) / "a.h5", labels, conf))
        work = seconds(compute)

        def both() -> None:
            thread = threading.Thread(target=write, args=(Path(tmp) / "b.h5", labels, conf))
            thread.start()
            compute()
            thread.join()

        together = seconds(both)
    hidden = (alone + work - together) / alone
    print(f"write {alone:.2f} s, compute {work:.2f} s, both (write in a thread) {together:.2f} s: "
          f"{100 * hidden:.0f} % of the write hidden")


if __name__ == "__main__":
    main()
