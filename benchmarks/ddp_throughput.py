"""Fine-tuning throughput, 1 process against 2 processes (torchrun's data parallelism, gloo, CPU).

Both runs train the demo's model (U-Net, ResNet-18 encoder) on the demo's synthetic source images
through the real training path: the augmented data set, :class:`~selftrain.streams.BatchStream`
(each rank drawing its share of the global batch), :class:`~selftrain.training.StepRunner` with
the non-finite guard, the loss meter and, with 2 processes, :class:`~selftrain.training.Replicas`
and the gradient all-reduce. The global batch is the same in both, so a step is the same amount
of work: the ratio is the speed-up of data parallelism (ideal: 2 with two free cores). Each
process uses ``--threads`` torch threads (torchrun's default is 1). The 1- and 2-process runs
alternate ``--repeats`` times (drift in the machine's load hits both alike); the median step time
of each is reported, with the 2-process run's share of time spent averaging gradients.

    python benchmarks/ddp_throughput.py [--steps 8] [--warmup 2] [--batch 16] [--repeats 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as td
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(args.threads)
    if world > 1:
        td.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                              timeout=datetime.timedelta(seconds=600))
    from selftrain import dist, training
    from selftrain.build import build_adapter, build_data
    from selftrain.catalog import resolve_recipe
    from selftrain.config import load_recipe
    from selftrain.streams import BatchStream
    from selftrain.tasks import build_task

    cfg = load_recipe(resolve_recipe("synth_source"), [])
    data = build_data(cfg)
    task = build_task("segmentation", data)
    gen = training.seed_everything(0)
    adapter = build_adapter(cfg)
    stream = BatchStream(task.augment(data.source), args.batch, gen, collate_fn=task.collate)
    opt = torch.optim.AdamW(adapter.parameters(), lr=3e-4, weight_decay=1e-4)
    hooks = [training.FiniteGuard(), *([training.Replicas([adapter])] if world > 1 else []), training.LossMeter()]
    runner = training.StepRunner(optimizer=opt, scheduler=training.make_scheduler(opt, "constant", 1), hooks=hooks)
    reduce_s = [0.0]
    average = dist.average_gradients

    def timed_average(params):
        start = time.perf_counter()
        average(params)
        reduce_s[0] += time.perf_counter() - start

    dist.average_gradients = timed_average

    def step(i):
        return training.StepResult(dict(task.supervised_step(adapter, next(stream), "cpu").losses))

    for i in range(args.warmup):
        runner.step(step, i)
    dist.barrier()
    reduce_s[0] = 0.0
    start = time.perf_counter()
    for i in range(args.steps):
        runner.step(step, args.warmup + i)
    dist.barrier()
    elapsed = time.perf_counter() - start
    if rank == 0:
        Path(out).write_text(json.dumps({"step_s": elapsed / args.steps, "reduce_share": reduce_s[0] / elapsed}))
    if world > 1:
        td.destroy_process_group()


def measure(world: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(worker, args=(world, free_port(), args, out), nprocs=world, join=True) if world > 1 \
            else worker(0, 1, 0, args, out)
        return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="global batch of a step (the demo's round 0: 16)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args()
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for _ in range(args.repeats):
        for world in (1, 2):
            runs[world].append(measure(world, args))
    one = statistics.median(r["step_s"] for r in runs[1])
    two = statistics.median(r["step_s"] for r in runs[2])
    print(json.dumps({"batch": args.batch, "steps": args.steps, "threads_per_process": args.threads,
                      "steps_per_s_1proc": round(1 / one, 3), "steps_per_s_2proc": round(1 / two, 3),
                      "speedup_2proc_over_1proc": round(one / two, 3),
                      "allreduce_share_2proc": round(statistics.median(r["reduce_share"] for r in runs[2]), 3),
                      "load_average": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
