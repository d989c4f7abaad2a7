"""The step runner's cost: one training step through ``StepRunner`` against a plain PyTorch loop.

Same model, batch, optimiser, schedule and data in both; the runner has no hook but the loss
average (``LossMeter``), the plain loop keeps the same running means as Python floats. The two are
timed in alternating blocks of steps (so drift in the machine's speed hits both alike) and the
median block time per step is compared. Goal: ratio <= 1.05.

    python benchmarks/step_runner.py [--model smp_unet|linear] [--batch 16] [--height 64] [--width 128]
                                     [--steps 10] [--blocks 5] [--precision fp32|bf16|fp16] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from selftrain.training import LossMeter, Precision, StepResult, StepRunner, make_scheduler

MODEL_OPTIONS = {"encoder": "resnet18", "decoder_channels": [128, 64, 32, 16, 16], "channels_last": True}


def setup(args):
    """Model, a fixed list of batches and the loss: the demo's U-Net and its cross-entropy, or a linear map."""
    torch.manual_seed(0)
    if args.model == "linear":
        model = nn.Linear(64, 10).to(args.device)
        data = [(torch.randn(args.batch, 64), torch.randint(0, 10, (args.batch,))) for _ in range(4)]
        return model, [(x.to(args.device), y.to(args.device)) for x, y in data], lambda m, x, y: {
            "ce": nn.functional.cross_entropy(m(x), y)}
    from selftrain.adapters import create_adapter

    model = create_adapter("smp_unet", num_classes=10, **MODEL_OPTIONS).to(args.device)
    data = [(torch.randn(args.batch, 3, args.height, args.width), torch.randint(0, 10, (args.batch, args.height, args.width)))
            for _ in range(4)]
    return model, [(x.to(args.device), y.to(args.device)) for x, y in data], lambda m, x, y: dict(
        m.forward_train(x, y).losses)


def optimiser(model, steps):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    return opt, make_scheduler(opt, "poly", steps)


def plain_block(model, data, losses_of, opt, sched, precision, steps, sums):
    scaler = precision.scaler()
    for i in range(steps):
        x, y = data[i % len(data)]
        with precision.autocast():
            losses = losses_of(model, x, y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(sum(losses.values())).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smp_unet", choices=["smp_unet", "linear"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--blocks", type=int, default=5, help="timed blocks per variant")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    model, data, losses_of = setup(args)
    precision = Precision(args.precision, args.device)
    total = args.steps * (args.blocks + 1)
    opt_a, sched_a = optimiser(model, total)
    runner = StepRunner(optimizer=opt_a, scheduler=sched_a, precision=precision, hooks=[LossMeter()])
    counter = [0]

    def step_fn(step):
        x, y = data[counter[0] % len(data)]
        counter[0] += 1
        return StepResult(losses_of(model, x, y))

    opt_b, sched_b = optimiser(model, total)  # the plain loop trains the same weights with its own state
    sums: dict[str, float] = {}
    plain_block(model, data, losses_of, opt_b, sched_b, precision, args.steps, sums)  # warm-up, both paths
    for i in range(args.steps):
        runner.step(step_fn, i)
    times = {"plain": [], "runner": []}
    for b in range(args.blocks):
        for name in ("plain", "runner") if b % 2 == 0 else ("runner", "plain"):
            sync(args.device)
            start = time.perf_counter()
            if name == "plain":
                plain_block(model, data, losses_of, opt_b, sched_b, precision, args.steps, sums)
            else:
                for i in range(args.steps):
                    runner.step(step_fn, i)
            sync(args.device)
            times[name].append((time.perf_counter() - start) / args.steps)
    plain, ours = statistics.median(times["plain"]), statistics.median(times["runner"])
    print(json.dumps({"model": args.model, "batch": args.batch, "size": [args.height, args.width],
                      "precision": args.precision, "device": args.device, "threads": torch.get_num_threads(),
                      "plain_s_per_step": round(plain, 6), "runner_s_per_step": round(ours, 6),
                      "overhead_us_per_step": round((ours - plain) * 1e6, 1), "ratio": round(ours / plain, 4)}))


if __name__ == "__main__":
    main()
