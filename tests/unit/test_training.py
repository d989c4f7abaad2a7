"""The step runner on an nn.Linear model: event order, equality with a plain loop, accumulation,
clipping, precision, hook optimisers, the non-finite guard and state round trips."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from selftrain.training import (FiniteGuard, HookBase, LossMeter, Precision, StepResult, StepRunner,
                                make_scheduler)


def linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(4, 2)


def data(n: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(3, 4, generator=g), torch.randn(3, 2, generator=g)) for _ in range(n)]


def step_fn(model: nn.Module, batches: list, counter: list[int] | None = None):
    """Each call takes the next batch (so accumulation draws several per step)."""
    counter = counter if counter is not None else [0]

    def fn(step: int) -> StepResult:
        x, y = batches[counter[0] % len(batches)]
        counter[0] += 1
        out = model(x)
        return StepResult({"mse": ((out - y) ** 2).mean(), "l1": (out - y).abs().mean() * 0.1})

    return fn


def runner(model: nn.Module, *, hooks=(), lr: float = 0.1, **kwargs) -> StepRunner:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return StepRunner(optimizer=opt, scheduler=make_scheduler(opt, "poly", 10), hooks=hooks, **kwargs)


class Recorder(HookBase):
    """Records every event and whether the model's weights had moved since the step began."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.events = model, []

    def before_step(self, step):
        self.start = self.model.weight.detach().clone()
        self.events.append(("before_step", step))

    def after_backward(self, runner, step, result):
        assert self.model.weight.grad is not None and set(result.losses) == {"mse", "l1"}
        self.events.append(("after_backward", step, torch.equal(self.model.weight, self.start)))

    def after_step(self, step, losses):
        assert all(v.dtype == torch.float64 and not v.requires_grad for v in losses.values())
        self.events.append(("after_step", step, torch.equal(self.model.weight, self.start)))


def test_hooks_see_the_events_in_order_and_the_update_between_backward_and_step():
    model = linear()
    rec = Recorder(model)
    runner(model, hooks=[rec], accumulate=2).run(step_fn(model, data()), steps=2, desc="t")
    assert rec.events == [("before_step", 0), ("after_backward", 0, True), ("after_backward", 0, True),
                          ("after_step", 0, False),
                          ("before_step", 1), ("after_backward", 1, True), ("after_backward", 1, True),
                          ("after_step", 1, False)]


def test_equals_a_plain_pytorch_loop_bit_for_bit():
    model, plain = linear(), linear()
    runner(model, hooks=[FiniteGuard(), LossMeter()]).run(step_fn(model, data()), steps=6, desc="t")
    opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    sched = make_scheduler(opt, "poly", 10)
    for x, y in data()[:6]:
        out = plain(x)
        loss = ((out - y) ** 2).mean() + (out - y).abs().mean() * 0.1
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.equal(a, b)


def test_accumulation_steps_once_on_the_mean_of_the_micro_batches():
    batches = data(4)
    model, ref = linear(), linear()
    meter = LossMeter()
    runner(model, hooks=[meter], accumulate=2, lr=0.5).run(step_fn(model, batches), steps=2, desc="t")
    opt = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
    sched = make_scheduler(opt, "poly", 10)
    means = []
    for pair in (batches[:2], batches[2:]):
        x, y = torch.cat([p[0] for p in pair]), torch.cat([p[1] for p in pair])
        out = ref(x)
        loss = ((out - y) ** 2).mean() + (out - y).abs().mean() * 0.1  # equal-size halves: mean of means
        means.append(((out - y) ** 2).mean().item())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    # the logged loss of a step is the mean over its micro-batches (computed before each update)
    assert meter.means(2)["mse"] == pytest.approx(sum(means) / 2, rel=1e-5)


def test_clipping_caps_the_global_gradient_norm():
    model, ref = linear(), linear()
    batches = [(x * 100, y) for x, y in data(1)]
    runner(model, clip_grad_norm=0.5, lr=1.0).step(step_fn(model, batches), 0)
    out = ref(batches[0][0])
    loss = ((out - batches[0][1]) ** 2).mean() + (out - batches[0][1]).abs().mean() * 0.1
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    assert norm > 0.5  # the test only means something when the cap bites
    with torch.no_grad():
        for p in ref.parameters():
            p -= 1.0 * p.grad
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_finite_guard_stops_before_the_update_and_names_every_loss():
    model = linear()
    before = model.weight.detach().clone()

    def bad(step):
        out = model(torch.ones(1, 4))
        return StepResult({"ce": out.sum() * float("nan"), "box": out.sum()})

    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 3: ce=nan, box="):
        runner(model, hooks=[FiniteGuard()]).step(bad, 3)
    assert torch.equal(model.weight, before)


class ExtraOptimizer(HookBase):
    """A discriminator-like hook: its own parameter, trained from its own loss in after_backward."""

    def __init__(self) -> None:
        self.w = nn.Parameter(torch.ones(()))
        self.opt = torch.optim.SGD([self.w], lr=0.25)

    def after_backward(self, runner, step, result):
        with runner.autocast():
            loss = (self.w - 3.0) ** 2
        runner.backward(loss)

    def optimizers(self):
        return [self.opt]


@pytest.mark.parametrize("accumulate", [1, 3])
def test_hook_optimizers_step_with_the_model_and_their_gradients_are_cleared(accumulate):
    model, hook = linear(), ExtraOptimizer()
    r = runner(model, hooks=[hook], accumulate=accumulate)
    r.step(step_fn(model, data()), 0)
    assert hook.w.item() == pytest.approx(1.0 + 0.25 * 4.0)  # one SGD step on d/dw (w - 3)^2 = -4
    r.step(step_fn(model, data()), 1)
    assert hook.w.item() == pytest.approx(2.0 + 0.25 * 2.0)  # gradients did not pile up across steps


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_half_precision_steps_train_with_finite_float32_weights(name):
    model = linear()
    meter = LossMeter()
    r = runner(model, hooks=[FiniteGuard(), meter], precision=Precision(name, "cpu"), lr=0.05)
    seen = []

    def fn(step):
        x, y = data()[step]
        out = model(x)
        seen.append(out.dtype)
        return StepResult({"mse": ((out.float() - y) ** 2).mean()})

    start = model.weight.detach().clone()
    r.run(fn, steps=4, desc="t")
    assert set(seen) == {torch.bfloat16 if name == "bf16" else torch.float16}
    assert model.weight.dtype == torch.float32 and torch.isfinite(model.weight).all()
    assert not torch.equal(model.weight, start) and r.scaler.is_enabled() == (name == "fp16")
    assert all(torch.isfinite(torch.tensor(v)) for v in meter.means(4).values())


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="fp32, bf16, fp16"):
        Precision("fp8")


def test_state_round_trip_continues_exactly():
    batches = data(8)
    full = linear()
    meter_full = LossMeter()
    runner(full, hooks=[meter_full], precision=Precision("fp16", "cpu")).run(step_fn(full, batches), steps=6, desc="t")

    part = linear()
    counter = [0]
    first = runner(part, hooks=[LossMeter()], precision=Precision("fp16", "cpu"))
    first.run(step_fn(part, batches, counter), steps=3, desc="t")
    state = first.state_dict()
    meter = LossMeter()
    second = runner(part, hooks=[meter], precision=Precision("fp16", "cpu"))
    second.load_state_dict(state)
    second.run(step_fn(part, batches, counter), steps=6, start=3, desc="t")
    for a, b in zip(full.parameters(), part.parameters()):
        assert torch.equal(a, b)
    assert second.scheduler.last_epoch == 6 and meter.means(6) == meter_full.means(6)


def test_loss_meter_sums_in_float64_and_starts_from_positive_zero():
    meter = LossMeter()
    for v in (torch.tensor(-0.0), torch.tensor(-0.0)):
        meter.add({"box": v})
    meter.add({"cls": torch.tensor(0.1, dtype=torch.float32)})
    meter.add({"cls": torch.tensor(0.2, dtype=torch.float32)})
    means = meter.means(2)
    assert str(means["box"]) == "0.0"  # as Python's 0.0 + -0.0
    assert means["cls"] == (float(torch.tensor(0.1)) + float(torch.tensor(0.2))) / 2
