"""The data-parallel pieces in a real two-process gloo group (spawned here, CPU): averaged gradients
equal one process's on the global batch, Replicas keep BatchNorm buffers equal, the non-finite guard
stops both ranks with one message, loss means and sharded evaluation equal one process's."""

from __future__ import annotations

import datetime
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as td
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import Dataset

from selftrain import dist
from selftrain.tasks import DetectionTask
from selftrain.training import (FiniteGuard, LossMeter, Replicas, StepResult, StepRunner, evaluate,
                                make_scheduler)
from selftrain.types import DetPrediction

pytestmark = pytest.mark.slow  # spawns a two-process group (about 6 s); the full suite runs it
WORLD = 2
X = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
Y = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))


def linear_steps(rows: slice, steps: int = 4, accumulate: int = 1) -> dict:
    """SGD with momentum on a linear model, the mean-squared error of ``X[rows]``: the weights after ``steps``."""
    torch.manual_seed(3)
    model = nn.Linear(5, 3)
    unused = nn.Parameter(torch.ones(2))  # a parameter no loss reaches: it must keep grad None everywhere
    opt = torch.optim.SGD([*model.parameters(), unused], lr=0.1, momentum=0.9, weight_decay=1e-3)
    runner = StepRunner(optimizer=opt, scheduler=make_scheduler(opt, "constant", steps), accumulate=accumulate,
                        clip_grad_norm=1.0)

    def step(i):
        return StepResult({"mse": ((model(X[rows]) - Y[rows]) ** 2).mean()})

    for i in range(steps):
        runner.step(step, i)
    return {**{k: v.clone() for k, v in model.state_dict().items()}, "unused_grad": unused.grad}


class Pixels(Dataset):
    def __len__(self) -> int:
        return 7

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"image": torch.randn(3, 4, 4, generator=g), "label": torch.randint(0, 3, (4, 4), generator=g), "id": str(i)}


class Conv:
    """A stand-in adapter: ``predict`` gives logits [B, 3, H, W]."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.net = nn.Conv2d(3, 3, 1)

    @torch.no_grad()
    def predict(self, images):
        return type("P", (), {"logits": self.net(images)})()


class Boxes(Dataset):
    """Image i: one ground-truth box of class 1 + i % 2."""

    def __len__(self) -> int:
        return 5

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.full((3, 8, 8), float(i)), "boxes": torch.tensor([[1.0, 1.0, 6.0, 6.0]]),
                "labels": torch.tensor([1 + i % 2]), "id": str(i)}


class Detector:
    """A stand-in detector: from image i (filled with i) one box of the right class, shifted off its
    ground truth for image 2 only (rank 0's shard, images 0 and 1, alone would score 100)."""

    def predict(self, images):
        out = []
        for im in images:
            i = int(im[0, 0, 0])
            box = torch.tensor([[1.0, 1.0, 6.0, 6.0]]) + (3 if i == 2 else 0)
            out.append(DetPrediction(boxes=box, scores=torch.tensor([0.5 + 0.1 * i]), labels=torch.tensor([1 + i % 2])))
        return out


def detection_map() -> dict:
    return DetectionTask(SimpleNamespace(eval_batch=2, num_classes=2)).evaluate(Detector(), Boxes(), device="cpu",
                                                                               desc="evaluate")


def worker(rank: int, port: int, out: str) -> None:
    td.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                          timeout=datetime.timedelta(seconds=60))
    results: dict = {"rank": rank}
    share = dist.shard(len(X))
    results["linear"] = linear_steps(slice(share.start, share.stop))
    results["linear_acc"] = linear_steps(slice(share.start, share.stop), accumulate=2)
    torch.manual_seed(rank)  # different weights and statistics on purpose: Replicas must make them equal
    bn = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    replicas = Replicas([bn])
    bn(torch.randn(2, 3, 4, 4) + rank)  # each rank's own batch moves its running statistics
    replicas.after_step(0, {})
    results["bn"] = {k: v.clone() for k, v in bn.state_dict().items()}
    guard = FiniteGuard()
    runner = type("R", (), {"desc": "round 0: source"})()
    try:
        guard.after_backward(runner, 7, StepResult({"src/ce": torch.tensor(float("nan") if rank == 1 else 1.0)}))
    except FloatingPointError as exc:
        results["guard"] = (str(exc), dist.raised_everywhere(exc))
    meter = LossMeter()
    meter.add({"a": torch.tensor(float(rank + 1))})
    results["means"] = meter.means(1)
    results["eval"] = evaluate(Conv(), Pixels(), num_classes=3, ignore_index=255, batch_size=2, device=torch.device("cpu"))
    results["map"] = detection_map()
    torch.save(results, f"{out}/rank{rank}.pt")
    td.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def group_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("group")
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("key,accumulate", [("linear", 1), ("linear_acc", 2)])
def test_averaged_gradients_train_as_one_process_on_the_global_batch(group_results, key, accumulate):
    one = linear_steps(slice(0, len(X)), accumulate=accumulate)
    for r in group_results:
        for name in ("weight", "bias"):
            # equal shares: the mean of the ranks' mean gradients is the global mean gradient; float
            # summation order is all that differs
            torch.testing.assert_close(r[key][name], one[name], rtol=0, atol=1e-6)
        assert r[key]["unused_grad"] is None and one["unused_grad"] is None
    assert torch.equal(group_results[0][key]["weight"], group_results[1][key]["weight"])


def test_replicas_make_parameters_and_batchnorm_buffers_equal_on_every_rank(group_results):
    a, b = group_results[0]["bn"], group_results[1]["bn"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_non_finite_loss_on_one_rank_stops_both_with_the_same_message(group_results):
    messages = [r["guard"] for r in group_results]
    assert messages[0] == messages[1]
    text, everywhere = messages[0]
    assert everywhere and "at step 7 (round 0: source) on rank 1: src/ce=nan" in text


def test_loss_means_and_sharded_evaluation_equal_one_process(group_results):
    assert group_results[0]["means"] == group_results[1]["means"] == {"a": 1.5}
    one = evaluate(Conv(), Pixels(), num_classes=3, ignore_index=255, batch_size=2, device=torch.device("cpu"))
    assert group_results[0]["eval"] == group_results[1]["eval"] == one
    assert group_results[0]["map"] == group_results[1]["map"] == detection_map()
    assert 0 < detection_map()["map"] < 100  # image 2's miss counts: every rank scored the whole set
