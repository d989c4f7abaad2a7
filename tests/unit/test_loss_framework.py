"""The loss-term framework: domain losses against direct computations, late launch, ordered updates
with their own optimisers (SCDA's D, Dw, G), term schedules that follow the phase's, step milestones,
the weight semantics of gradient-reversal terms, logging, and the older checkpoint layout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selftrain.losses import (
    DANN,
    DiscriminatorUpdate,
    LossTerm,
    LossTerms,
    OutputSpace,
    Update,
    WeightedTerm,
    bce_domain_loss,
    domain_accuracy,
    focal_domain_loss,
    least_squares_domain_loss,
    sync_gradients,
)
from selftrain.training import LRSchedule, OptimSpec, Precision, StepResult, StepRunner, lr_factor, make_scheduler
from selftrain.types import StepBatch, StepOutputs

# --------------------------------------------------------------------------- pure functions


def direct_focal(logits: torch.Tensor, domain: int, gamma: float) -> float:
    """SWDA / HTCN's FocalLoss(class_num=2): softmax, p of the true class, -(1 - p)^gamma log p, mean."""
    total = 0.0
    for row in logits.double().tolist():
        p = math.exp(row[domain]) / sum(math.exp(v) for v in row)
        total += -((1 - p) ** gamma) * math.log(p)
    return total / len(logits)


@pytest.mark.parametrize("gamma,domain", [(3.0, 0), (3.0, 1), (5.0, 1), (0.0, 0)])
def test_focal_domain_loss_matches_the_direct_computation(gamma, domain):
    logits = torch.randn(9, 2, generator=torch.Generator().manual_seed(3)) * 3
    got = focal_domain_loss(logits, domain, gamma)
    assert got.item() == pytest.approx(direct_focal(logits, domain, gamma), rel=1e-5)
    if gamma == 0:
        assert got.item() == pytest.approx(F.cross_entropy(logits, torch.full((9,), domain)).item(), rel=1e-6)


def test_focal_domain_loss_down_weights_easy_rows_and_refuses_one_logit_input():
    easy, hard = torch.tensor([[6.0, -6.0]]), torch.tensor([[0.2, 0.0]])
    ratio_easy = focal_domain_loss(easy, 0, 3.0) / focal_domain_loss(easy, 0, 0.0)
    ratio_hard = focal_domain_loss(hard, 0, 3.0) / focal_domain_loss(hard, 0, 0.0)
    assert ratio_easy < 1e-12 < ratio_hard < 0.2
    with pytest.raises(ValueError, match=r"two-way logits \[N, 2\]"):
        focal_domain_loss(torch.zeros(4, 1), 0)


def test_bce_and_least_squares_domain_losses_match_direct_computations():
    x = torch.randn(2, 1, 3, 4, generator=torch.Generator().manual_seed(4))
    s = x.double().sigmoid()
    assert bce_domain_loss(x, 1.0).item() == pytest.approx(float(-(s.log()).mean()), rel=1e-6)
    assert bce_domain_loss(x, 0.0).item() == pytest.approx(float(-((1 - s).log()).mean()), rel=1e-6)
    assert least_squares_domain_loss(s.float(), 1.0).item() == pytest.approx(float(((s - 1) ** 2).mean()), rel=1e-6)
    assert least_squares_domain_loss(x, 0.0).item() == pytest.approx(float((x.double() ** 2).mean()), rel=1e-6)


def test_domain_accuracy_for_one_logit_and_two_way_classifiers():
    one = torch.tensor([-1.0, 2.0, 3.0, -0.5])  # target, said for 2 of 4
    assert domain_accuracy(one, 1.0).item() == 0.5 and domain_accuracy(one, 0.0).item() == 0.5
    two = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    assert domain_accuracy(two, 1).item() == pytest.approx(2 / 3) and domain_accuracy(two, 0).item() == pytest.approx(1 / 3)


# --------------------------------------------------------------------------- schedules


def lrs(schedule, steps: int) -> list[float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(()))], lr=1.0)
    sched = make_scheduler(opt, schedule, steps)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_step_milestones_and_gamma():
    assert lrs(LRSchedule("step", (5,), 0.1), 7) == [1.0] * 5 + [pytest.approx(0.1)] * 2  # 50k of 70k, scaled
    assert lrs(LRSchedule("step", (2, 4), 0.5), 5) == [1.0, 1.0, 0.5, 0.5, 0.25]
    assert lrs("step", 12) == lrs(LRSchedule("step"), 12) == [1.0] * 8 + [pytest.approx(0.1)] * 2 + [pytest.approx(0.01)] * 2
    assert lrs(LRSchedule("step", (99,)), 3) == [1.0] * 3  # a milestone past the phase never fires


@pytest.mark.parametrize("kind", ["constant", "poly", "step", "onecycle"])
def test_lr_factor_is_the_schedules_multiple_of_the_given_rate(kind):
    opt = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(()))], "lr": 0.2},
                           {"params": [nn.Parameter(torch.zeros(()))], "lr": 2.0}])
    sched = make_scheduler(opt, kind, 6)
    for _ in range(6):
        assert lr_factor(sched) == pytest.approx(opt.param_groups[1]["lr"] / 2.0)
        opt.step()
        sched.step()
    if kind == "step":
        assert lr_factor(sched) == pytest.approx(0.01)


# --------------------------------------------------------------------------- a step through the hook


class Scalars(LossTerm):
    """Three scalar parameters a, b, c with SCDA's three ordered updates, each with its own optimiser:
    "d" pulls a to 1 (SGD lr 0.5), "dw" pulls b to the stepped a (SGD lr 0.5), "g" moves c (Adam)."""

    name = "scalars"

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.a, self.b, self.c = (nn.Parameter(torch.zeros(())) for _ in range(3))

    def forward(self, step):
        return {"probe": self.a * 0 + step.source.logits.sum()}

    def updates(self):
        sgd = OptimSpec(name="sgd", lr=0.5, momentum=0.0, weight_decay=0.0)
        return [Update("d", [self.a], lambda s: {"d": (self.a - 1) ** 2}, sgd),
                Update("dw", [self.b], lambda s: {"dw": (self.b - self.a.detach()) ** 2}, sgd),
                Update("g", [self.c], lambda s: {"g": self.c - 1}, OptimSpec(name="adam", lr=0.1, weight_decay=0.0))]


def batch(progress: float, value: float = 1.0) -> StepBatch:
    x = torch.full((1, 1), value, requires_grad=True)
    return StepBatch(source=StepOutputs({}, x), target=StepOutputs({}, x), step=0, progress=progress)


def run_steps(terms: LossTerms, batches: list[StepBatch], *, schedule="constant", lr: float = 1.0,
              accumulate: int = 1) -> DiscriminatorUpdate:
    hook = DiscriminatorUpdate(terms, "source")
    dummy = nn.Parameter(torch.zeros(()))
    opt = torch.optim.SGD([dummy], lr=lr)
    runner = StepRunner(optimizer=opt, scheduler=make_scheduler(opt, schedule, len(batches) // accumulate),
                        hooks=[hook], accumulate=accumulate)
    feed = iter(batches)

    def step_fn(i):
        b = next(feed)
        return StepResult({**terms.losses(b, "source"), "dummy": dummy * 0}, b)

    for i in range(len(batches) // accumulate):
        runner.step(step_fn, i)
    return hook


def test_ordered_updates_each_step_their_own_optimiser_in_order():
    term = Scalars()
    terms = LossTerms([WeightedTerm(key="s", weight=1.0, term=term)])
    terms.prepare("cpu")
    assert [type(o).__name__ for o in terms.optimizers[0].values()] == ["SGD", "SGD", "Adam"]
    hook = run_steps(terms, [batch(0.0)])
    assert term.a.item() == pytest.approx(1.0)  # 0 - 0.5 * 2 * (0 - 1)
    assert term.b.item() == pytest.approx(1.0)  # pulled to the a that "d" had just stepped, not to 0
    assert term.c.item() == pytest.approx(-0.1)  # Adam's first step is lr x sign
    logged = hook.meter.means(1)
    assert logged["s/d"] == pytest.approx(1.0) and logged["s/dw"] == pytest.approx(1.0) and logged["s/g"] == -1.0
    state = terms.state_dict()
    assert list(state["updates"][0]) == ["d", "dw", "g"]
    twin = LossTerms([WeightedTerm(key="s", weight=1.0, term=Scalars())])
    twin.prepare("cpu")
    twin.load_state_dict(state)
    assert twin.optimizers[0]["g"].state_dict()["state"][0]["step"] == 1


def test_late_launch_skips_the_term_and_its_updates_until_start():
    term = Scalars()
    terms = LossTerms([WeightedTerm(key="s", weight=1.0, term=term, start=0.5)])
    terms.prepare("cpu")
    assert terms.losses(batch(0.49), "source") == {} and float(terms.take_logged()["s/active"]) == 0.0
    hook = run_steps(terms, [batch(0.0), batch(0.25)])
    assert term.a.item() == 0.0 and term.c.item() == 0.0 and all(p.grad is None for p in term.parameters())
    assert hook.meter.means(2) == {"s/active": 0.0}
    hook = run_steps(terms, [batch(0.25), batch(0.5), batch(0.75)])
    assert hook.meter.means(3)["s/active"] == pytest.approx(2 / 3)
    assert term.c.item() == pytest.approx(-0.2, abs=1e-6)  # two Adam steps: 0.5 and 0.75
    with pytest.raises(ValueError, match=r"start must be in \[0, 1\]"):
        WeightedTerm(key="s", weight=1.0, term=Scalars(), start=1.5)


class Grl(LossTerm):
    """One parameter learning through the model's backward (no loss of its own), SGD lr 0.1."""

    name = "grl"
    default_optim = {"name": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0}

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, step):
        return {"l": self.w * step.source.logits.sum()}


@pytest.mark.parametrize("schedule,expected", [("constant", [0.1, 0.1, 0.1]), ("follow", [0.1, 0.1, 0.01])])
def test_a_term_optimiser_follows_the_phase_schedule_or_stays_constant(schedule, expected):
    term = Grl(optim={"schedule": schedule})
    terms = LossTerms([WeightedTerm(key="g", weight=1.0, term=term)])
    terms.prepare("cpu")
    hook = DiscriminatorUpdate(terms, "source")
    dummy = nn.Parameter(torch.zeros(()))
    opt = torch.optim.SGD([dummy], lr=1.0)
    runner = StepRunner(optimizer=opt, scheduler=make_scheduler(opt, LRSchedule("step", (2,)), 3), hooks=[hook])
    moves = []
    for i in range(3):  # the phase drops x0.1 at step 2 of 3
        before = term.w.item()
        b = batch(i / 3)
        runner.step(lambda _: StepResult({**terms.losses(b, "source"), "dummy": dummy * 0}, b), i)
        moves.append(before - term.w.item())  # gradient 1: the move is the learning rate
    assert moves == pytest.approx(expected)
    assert Grl().optim_schedule == "constant"  # the default: a fixed learning rate, as before
    with pytest.raises(ValueError, match="unknown optim schedule 'cosine'; choose constant or follow"):
        Grl(optim={"schedule": "cosine"})


def test_accumulated_micro_batches_average_an_updates_loss_as_one_batch():
    torch.manual_seed(0)
    one, two = OutputSpace(ndf=4), OutputSpace(ndf=4)

    class Seg:
        num_classes = 4

    one.attach(Seg(), "segmentation")
    two.attach(Seg(), "segmentation")
    two.load_state_dict(one.state_dict())
    src, tgt = torch.randn(2, 4, 32, 32), torch.randn(2, 4, 32, 32)
    whole = StepBatch(source=StepOutputs({}, src), target=StepOutputs({}, tgt.requires_grad_()), step=0, progress=0.0)
    halves = [StepBatch(source=StepOutputs({}, src[i:i + 1]), target=StepOutputs({}, tgt[i:i + 1]), step=0,
                        progress=0.0) for i in range(2)]
    a = LossTerms([WeightedTerm(key="o", weight=1.0, term=one, phases=("source",))])
    b = LossTerms([WeightedTerm(key="o", weight=1.0, term=two, phases=("source",))])
    a.prepare("cpu")
    b.prepare("cpu")
    hook_a, hook_b = run_steps(a, [whole]), run_steps(b, halves, accumulate=2)
    for p, q in zip(one.parameters(), two.parameters()):
        assert torch.allclose(p, q, atol=1e-6)  # no batch statistics in D: the same mean gradient
    assert hook_a.meter.means(1)["o/d"] == pytest.approx(hook_b.meter.means(1)["o/d"], rel=1e-5)


# --------------------------------------------------------------------------- GRL weight semantics


class Taps:
    def feature_channels(self):
        return {"f": 3}


def dann_gradients(weight: float, coeff: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(0)
    term = DANN(tap="f", hidden=4, coeff=coeff, schedule="constant")
    term.attach(Taps(), "detection")
    fs, ft = torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 3, 4, 4) + 1
    step = StepBatch(source=StepOutputs({}, torch.zeros(1), {"f": fs}),
                     target=StepOutputs({}, torch.zeros(1), {"f": ft}), step=0, progress=0.5)
    terms = LossTerms([WeightedTerm(key="dann", weight=weight, term=term)])
    sum(terms.losses(step, "source").values()).backward()
    return fs.grad, [p.grad for p in term.parameters()]


def test_the_weight_scales_both_gradients_of_a_grl_term_and_coeff_only_the_reversed_one():
    f1, d1 = dann_gradients(1.0, 1.0)
    f_w, d_w = dann_gradients(0.3, 1.0)
    f_c, d_c = dann_gradients(1.0, 0.5)
    assert torch.allclose(f_w, 0.3 * f1, atol=1e-8) and all(torch.allclose(a, 0.3 * b, atol=1e-8) for a, b in zip(d_w, d1))
    assert torch.allclose(f_c, 0.5 * f1, atol=1e-8) and all(torch.equal(a, b) for a, b in zip(d_c, d1))
    torch.manual_seed(0)
    plain = DANN(tap="f", hidden=4, schedule="constant")
    plain.attach(Taps(), "detection")
    fs = torch.randn(2, 3, 4, 4, requires_grad=True)
    bce_domain_loss(plain.discriminator(fs), 0.0).backward()  # the source half, without the reversal
    assert torch.allclose(f1, -fs.grad / 2, atol=1e-7)  # reversed: the extractor maximises D's loss


# --------------------------------------------------------------------------- checkpoints, processes


def test_the_older_checkpoint_layout_loads_into_the_single_update():
    torch.manual_seed(0)
    term, twin = Grl(), Grl()
    terms = LossTerms([WeightedTerm(key="g", weight=1.0, term=term)])
    terms.prepare("cpu")
    run_steps(terms, [batch(0.0)])
    state = terms.state_dict()
    older = {"terms": state["terms"], "optimizers": [state["updates"][0]["d"]]}  # one optimiser state per term
    copy = LossTerms([WeightedTerm(key="g", weight=1.0, term=twin)])
    copy.prepare("cpu")
    copy.load_state_dict(older)
    assert twin.w.item() == term.w.item()
    assert copy.optimizers[0]["d"].state_dict() == terms.optimizers[0]["d"].state_dict()
    empty = LossTerms([WeightedTerm(key="g", weight=1.0, term=Grl())])
    empty.prepare("cpu")
    empty.load_state_dict({"terms": state["terms"], "optimizers": [None]})  # a term that had no optimiser


def test_gradient_sync_is_nothing_to_do_in_one_process():
    p = nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    sync_gradients([p])
    assert torch.equal(p.grad, torch.full((2,), 3.0))


def fp16_run(precision: str) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Two steps of a DANN term and a late-launched twin (start 0.5 of 4 steps) on a 1x1 conv."""
    torch.manual_seed(0)
    model = nn.Conv2d(3, 3, 1)
    dann, late = DANN(tap="f", hidden=4, schedule="constant"), DANN(tap="f", hidden=4, schedule="constant")
    dann.attach(Taps(), "detection")
    late.attach(Taps(), "detection")
    terms = LossTerms([WeightedTerm("dann", 1.0, dann), WeightedTerm("late", 1.0, late, start=0.5)])
    terms.prepare("cpu")
    start = [p.detach().clone() for p in dann.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    runner = StepRunner(optimizer=opt, scheduler=make_scheduler(opt, "constant", 4),
                        precision=Precision(precision, "cpu"), hooks=[DiscriminatorUpdate(terms, "source")])
    x = torch.randn(2, 3, 8, 8)

    def step_fn(i):
        f = model(x)
        b = StepBatch(source=StepOutputs({}, f, {"f": f}), target=StepOutputs({}, f, {"f": f + 1}), step=i,
                      progress=i / 4)
        return StepResult(terms.losses(b, "source"), b)

    late_start = [p.detach().clone() for p in late.parameters()]
    for i in range(2):
        runner.step(step_fn, i)
    assert all(torch.equal(a, b) for a, b in zip(late_start, late.parameters()))  # not launched: untouched
    return start, list(dann.parameters()), late_start


def test_under_fp16_the_model_gradients_are_unscaled_before_a_grl_term_steps():
    start, fp32, _ = fp16_run("fp32")
    _, fp16, _ = fp16_run("fp16")  # the runner's GradScaler starts at 65536
    for p0, a, b in zip(start, fp32, fp16):
        moved = (a - p0).abs().max()
        assert moved > 0 and (a - b).abs().max() < 0.05 * moved


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_an_update_without_losses_this_step_does_not_step(precision):
    term = Scalars()
    term.updates = lambda: [Update("quiet", [term.a], lambda s: {}, OptimSpec(name="sgd", lr=0.5, weight_decay=0.1))]
    terms = LossTerms([WeightedTerm(key="s", weight=1.0, term=term)])
    terms.prepare("cpu")
    dummy = nn.Parameter(torch.ones(()))
    opt = torch.optim.SGD([dummy], lr=0.1)
    runner = StepRunner(optimizer=opt, scheduler=make_scheduler(opt, "constant", 1),
                        precision=Precision(precision, "cpu"), hooks=[DiscriminatorUpdate(terms, "source")])
    b = batch(0.0)
    term.a.data.fill_(2.0)
    runner.step(lambda i: StepResult({**terms.losses(b, "source"), "dummy": dummy * 1}, b), 0)
    assert term.a.item() == 2.0  # no gradient: weight decay did not move it either
