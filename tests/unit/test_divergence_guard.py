"""A diverging run: the step runner's guard stops it on a loss far above its running level (not
only on NaN), and the pseudo-boxes a diverged detector makes never reach torchvision."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from selftrain.adapters import create_adapter
from selftrain.config import OptimConfig
from selftrain.detection import keep_plausible, plausible_boxes
from selftrain.policies import create_policy
from selftrain.tasks import DetectionTask
from selftrain.training import (DIVERGENCE_FACTOR, FiniteGuard, OptimSpec, StepResult, StepRunner, make_optimizer,
                                make_scheduler)
from selftrain.types import DetPrediction

RUNNER = SimpleNamespace(desc="round 2: fine-tune")


def feed(guard: FiniteGuard, series: list[dict[str, float]], runner=RUNNER) -> None:
    for step, losses in enumerate(series):
        guard.after_backward(runner, step, StepResult({k: torch.tensor(v) for k, v in losses.items()}))


def noisy_decreasing(steps: int, seed: int = 0) -> list[dict[str, float]]:
    """Losses as training makes them: decaying, noisy, with an odd hard batch 30x the level."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(steps):
        level = 3.0 * math.exp(-i / 60) + 1e-3
        noise = float(torch.rand((), generator=g)) + 0.5
        spike = 30.0 if i % 97 == 50 else 1.0
        out.append({"src/ce": level * noise * spike, "tgt/ce": 0.5 * level * noise, "bsr/adv": -0.7 * noise})
    return out


def test_a_jump_stops_the_phase_with_the_losses_the_round_and_the_step():
    guard = FiniteGuard(1e3)
    series = [{"src/ce": 2.0 - 0.1 * i, "tgt/ce": 1.0} for i in range(8)] + [{"src/ce": 5e12, "tgt/ce": 4e11}]
    with pytest.raises(FloatingPointError) as info:
        feed(guard, series)
    message = str(info.value)
    assert message.startswith("loss diverged at step 8 (round 2: fine-tune): src/ce=5e+12 is over 1000 x")
    assert "losses: src/ce=5e+12, tgt/ce=4e+11" in message and "\n" not in message


def test_normal_noisy_decreasing_losses_pass():
    guard = FiniteGuard()
    feed(guard, noisy_decreasing(600))
    assert guard.level("src/ce") == 1.0  # the floor: the median fell below 1
    assert len(guard.history["src/ce"]) == guard.window


def test_a_converged_loss_meeting_a_hard_batch_is_not_divergence():
    guard = FiniteGuard()
    feed(guard, [{"src/ce": 1e-5}] * 40 + [{"src/ce": 0.9}, {"src/ce": 20.0}])


def test_one_component_is_checked_against_its_own_level():
    """A small component that explodes is caught even where the total would hide it."""
    guard = FiniteGuard()
    series = [{"src/ce": 900.0, "tgt/ce": 0.5}] * 10 + [{"src/ce": 900.0, "tgt/ce": 5000.0}]
    with pytest.raises(FloatingPointError, match=r"tgt/ce=5000 is over 1000 x its running level 1;"):
        feed(guard, series)


def test_a_component_diverging_below_zero_is_caught():
    guard = FiniteGuard()
    with pytest.raises(FloatingPointError, match=r"bsr/adv=-1e\+09"):
        feed(guard, [{"bsr/adv": -0.7}] * 5 + [{"bsr/adv": -1e9}])


def test_null_checks_non_finite_losses_only():
    guard = FiniteGuard(None)
    feed(guard, [{"src/ce": 2.0}] * 5 + [{"src/ce": 1e30}])
    with pytest.raises(FloatingPointError, match=r"^non-finite loss at step 1 \(round 2: fine-tune\): src/ce=nan"):
        feed(guard, [{"src/ce": 2.0}, {"src/ce": float("nan")}])


def test_the_first_value_sets_the_level():
    guard = FiniteGuard()
    feed(guard, [{"src/ce": 1e6}])  # nothing to compare with yet
    with pytest.raises(FloatingPointError):
        feed(FiniteGuard(), [{"src/ce": 2.0}, {"src/ce": 2.5e3}])


def test_factor_must_exceed_one():
    with pytest.raises(ValueError, match="divergence_factor must be > 1"):
        FiniteGuard(0.5)


def test_level_survives_a_step_checkpoint():
    guard = FiniteGuard()
    feed(guard, [{"src/ce": 4.0}] * 3)
    restored = FiniteGuard()
    restored.load_state_dict(guard.state_dict())
    assert restored.level("src/ce") == 4.0
    with pytest.raises(FloatingPointError):
        feed(restored, [{"src/ce": 4.1e3}])
    FiniteGuard().load_state_dict({})  # a step checkpoint written before the guard kept a level


def test_recipe_default_is_the_guard_default():
    assert OptimConfig().divergence_factor == OptimSpec().divergence_factor == DIVERGENCE_FACTOR


def test_the_diverged_step_is_never_applied():
    """The guard raises before the optimiser steps: the parameters stay those of the last good step."""
    weight = torch.nn.Parameter(torch.ones(3))
    spec = OptimSpec(lr=0.1, momentum=0.0, weight_decay=0.0)
    optimizer = make_optimizer([weight], spec)
    runner = StepRunner(optimizer=optimizer, scheduler=make_scheduler(optimizer, "constant", 10),
                        hooks=[FiniteGuard(spec.divergence_factor)])
    scales = [1.0, 1.0, 1.0, 1e7]
    seen: list[torch.Tensor] = []

    def step(i: int) -> StepResult:
        seen.append(weight.detach().clone())
        return StepResult({"src/ce": scales[i] * (weight ** 2).sum()})

    with pytest.raises(FloatingPointError, match=r"at step 3 \(round 1: fine-tune\)"):
        runner.run(step, steps=4, desc="round 1: fine-tune")
    assert torch.equal(weight.detach(), seen[3])


# --------------------------------------------------------------------------- a diverged detector's boxes


BAD = torch.tensor([[10.0, 10.0, 10.0, 30.0],   # zero width
                    [20.0, 20.0, 12.0, 40.0],   # inverted
                    [5.0, 5.0, 5.5, 30.0],      # under a pixel wide
                    [float("nan"), 1.0, 20.0, 20.0],
                    [1.0, 1.0, float("inf"), 20.0]])
GOOD = torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 30.0, 31.0, 31.0]])


def test_plausible_boxes():
    assert plausible_boxes(torch.cat([BAD, GOOD])).tolist() == [False] * 5 + [True, True]
    assert plausible_boxes(torch.zeros(0, 4)).shape == (0,)
    made = keep_plausible({"boxes": torch.cat([GOOD[:1], BAD]), "labels": torch.arange(1, 7),
                           "scores": torch.linspace(0.9, 1.0, 6)})
    assert made["labels"].tolist() == [1] and torch.equal(made["boxes"], GOOD[:1])


class DivergedTeacher:
    """Predicts, with full confidence, every box a diverged detector makes and one good box."""

    def predict(self, images):
        boxes = torch.cat([BAD, GOOD[:1]])
        n = len(boxes)
        probs = torch.zeros(n, 3)
        probs[:, 1] = 1.0
        candidates = {"boxes": boxes, "scores": torch.ones(n), "labels": torch.ones(n, dtype=torch.int64)}
        return [DetPrediction(boxes=boxes, scores=torch.ones(n), labels=torch.ones(n, dtype=torch.int64),
                              raw_boxes=boxes, raw_probs=probs, class_candidates=candidates) for _ in images]


@pytest.mark.parametrize("policy", ["det_st", "wst", "mean_teacher"])
def test_online_step_drops_boxes_torchvision_rejects(policy):
    torch.manual_seed(0)
    adapter = create_adapter("tiny_ssd", num_classes=2)
    batch = {"image": [torch.rand(3, 64, 64), torch.rand(3, 64, 64)], "id": ["a", "b"]}
    task = DetectionTask(SimpleNamespace(num_classes=2))
    made = create_policy(policy).detections(DivergedTeacher().predict(batch["image"]), 0.5)
    assert [m["boxes"].tolist() for m in made] == [GOOD[:1].tolist()] * 2
    with pytest.raises(ValueError, match="has no area"):  # what the detector does with them
        adapter.forward_train(batch["image"], [{"boxes": BAD[:1], "labels": torch.ones(1, dtype=torch.int64)}] * 2)
    out = task.online_step(adapter, DivergedTeacher(), create_policy(policy), batch, device="cpu", progress=0.5)
    assert all(bool(torch.isfinite(v)) for v in out.losses.values()), out.losses


class AnyPolicy:
    """An online policy that passes every detection on, as a user's own policy may."""

    strong_augment, negatives, box_loss = False, "hard", False

    def detections(self, preds, progress):
        return [{"boxes": p.boxes, "labels": p.labels, "scores": p.scores} for p in preds]


def test_detection_task_filters_boxes_of_any_policy():
    torch.manual_seed(0)
    adapter = create_adapter("tiny_ssd", num_classes=2)
    batch = {"image": [torch.rand(3, 64, 64)], "id": ["a"]}
    out = DetectionTask(SimpleNamespace(num_classes=2)).online_step(adapter, DivergedTeacher(), AnyPolicy(), batch,
                                                                    device="cpu", progress=0.5)
    assert all(bool(torch.isfinite(v)) for v in out.losses.values()), out.losses
