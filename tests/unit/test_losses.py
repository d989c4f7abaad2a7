"""Extra loss terms against direct computations: the gradient reversal layer, BSR (Kim et al. 2019,
Eq. 7 and its example selection), DANN's domain loss, AdaptSegNet's output-space losses, and the
container that weights them once and steps their discriminators."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selftrain.errors import ConfigError
from selftrain.losses import (
    BSR,
    DANN,
    LOSSES,
    DiscriminatorUpdate,
    LossTerms,
    OutputSpace,
    WeightedTerm,
    bsr_loss,
    create_loss,
    ganin_coeff,
    grad_reverse,
    reverse_gradient,
)
from selftrain.training import StepResult, StepRunner, make_scheduler
from selftrain.types import StepBatch, StepOutputs


def test_grad_reverse_is_identity_forward_and_negates_the_gradient():
    x = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(4, 3)
    y = grad_reverse(x, 0.3)
    assert torch.equal(y, x)
    (y * w).sum().backward()
    assert torch.allclose(x.grad, -0.3 * w)


def test_reverse_gradient_flips_the_layers_before_the_hooked_module_only():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(8, 5)

    def grads(reverse: bool) -> list[torch.Tensor]:
        net.zero_grad()
        if reverse:
            with reverse_gradient(net[1], coeff=0.5):
                out = net(x)
        else:
            out = net(x)
        out.pow(2).sum().backward()
        return [p.grad.clone() for p in net.parameters()]

    plain, reversed_ = grads(False), grads(True)
    assert torch.allclose(reversed_[0], -0.5 * plain[0]) and torch.allclose(reversed_[1], -0.5 * plain[1])
    assert torch.allclose(reversed_[2], plain[2]) and torch.allclose(reversed_[3], plain[3])
    assert not net[1]._forward_hooks  # the hook is gone after the block
    assert torch.equal(grads(False)[0], plain[0])


def test_ganin_coefficient_schedule():
    assert ganin_coeff(0.0) == 0.0
    assert ganin_coeff(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert ganin_coeff(1.0) == pytest.approx(0.99991, abs=1e-5)


def direct_bsr(logits: torch.Tensor, t: float, gamma: float, ratio: int) -> float:
    """Eq. 7 over the lowest ratio*N background scores, N = examples predicted foreground, / N."""
    p = logits.double().softmax(1)
    n = int((p.argmax(1) != 0).sum())
    if n == 0:
        return 0.0
    p0 = sorted(p[:, 0].tolist())[: ratio * n]
    total = 0.0
    for v in p0:
        w = abs(t - v) ** gamma
        total += -t * w * math.log(v) - (1 - t) * w * math.log(1 - v)
    return total / n


@pytest.mark.parametrize("t,gamma,ratio", [(0.5, 2.0, 3), (0.3, 0.0, 3), (0.5, 5.0, 1)])
def test_bsr_loss_matches_equation_7(t, gamma, ratio):
    torch.manual_seed(1)
    logits = torch.randn(500, 7) * 2
    logits[:, 0] += 2.5  # mostly background, as a detector's default boxes
    got = bsr_loss(logits.log_softmax(1), t=t, gamma=gamma, neg_ratio=ratio)
    assert got.item() == pytest.approx(direct_bsr(logits, t, gamma, ratio), rel=1e-5)


def test_bsr_loss_is_zero_without_foreground_and_keeps_at_most_all_examples():
    logits = torch.zeros(10, 3)
    logits[:, 0] = 5.0
    assert bsr_loss(logits.log_softmax(1)).item() == 0.0
    logits[:, 0] = -5.0  # all foreground: 3N > M, every example counts
    assert bsr_loss(logits.log_softmax(1)).item() == pytest.approx(direct_bsr(logits, 0.5, 2.0, 3), rel=1e-6)


def test_minimising_bsr_moves_the_selected_background_scores_towards_t():
    torch.manual_seed(2)
    logits = (torch.randn(200, 4) * 3).requires_grad_()
    before = logits.detach().softmax(1)[:, 0]
    chosen = before.argsort()[: 3 * int((logits.detach().argmax(1) != 0).sum())]
    opt = torch.optim.SGD([logits], lr=20.0)
    for _ in range(10):
        opt.zero_grad()
        bsr_loss(logits.log_softmax(1)).backward()
        opt.step()
    after = logits.detach().softmax(1)[:, 0]
    assert (after[chosen] - 0.5).abs().mean() < (before[chosen] - 0.5).abs().mean() - 0.01


def tiny_ssd_adapter():
    from selftrain.adapters import ADAPTERS

    torch.manual_seed(0)
    return ADAPTERS.get("tiny_ssd")(num_classes=3, size=64, width=16)


def test_bsr_term_trains_the_classifier_down_and_the_features_up():
    adapter = tiny_ssd_adapter()
    term = BSR()
    term.attach(adapter, "detection")
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    step = StepBatch(source=None, target=None, step=0, progress=0.0, adapter=adapter, target_images=images)

    def grads(use_term: bool) -> dict[str, torch.Tensor]:
        adapter.model.zero_grad()
        torch.manual_seed(3)
        if use_term:
            loss = term(step)["bsr"]
        else:
            log_probs = adapter.forward_train(images).logits.float().flatten(0, -2).log_softmax(-1)
            loss = bsr_loss(log_probs)
        loss.backward()
        return {n: p.grad.clone() for n, p in adapter.model.named_parameters() if p.grad is not None}

    plain, term_grads = grads(False), grads(True)
    # tiny_ssd's first map leaves the trunk after its stride-4 stage (features[2]): F is features[0..2]
    trunk = adapter.model.backbone.features[:3]
    assert adapter.trunk_end() is trunk[-1]
    feature_params = {f"backbone.features.{n}" for n, _ in trunk.named_parameters()}
    assert feature_params and plain.keys() == term_grads.keys()
    for name, g in plain.items():
        expected = -g if name in feature_params else g
        assert torch.allclose(term_grads[name], expected, atol=1e-6), name
    assert not adapter.trunk_end()._forward_hooks


def test_bsr_refuses_a_two_stage_detector_and_segmenters():
    from selftrain.adapters import ADAPTERS

    frcnn = ADAPTERS.get("fasterrcnn_mobilenet")(num_classes=2, min_size=64, max_size=64) \
        if "fasterrcnn_mobilenet" in ADAPTERS else None
    if frcnn is not None:
        with pytest.raises(ConfigError, match="one-stage detector"):
            BSR().attach(frcnn, "detection")
    with pytest.raises(ConfigError, match="works for detection"):
        BSR().attach(object(), "segmentation")


def features(seed: int, shape=(2, 6, 5, 5)) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(*shape, requires_grad=True)


def test_dann_domain_loss_and_reversed_feature_gradient():
    adapter = tiny_ssd_adapter()
    term = DANN(tap="conv4_3", hidden=8, schedule="constant", coeff=0.7)
    term.attach(adapter, "detection")
    channels = adapter.feature_channels()["conv4_3"]
    fs, ft = features(0, (2, channels, 4, 4)), features(1, (3, channels, 4, 4))
    step = StepBatch(source=StepOutputs({}, torch.zeros(1), {"conv4_3": fs}),
                     target=StepOutputs({}, torch.zeros(1), {"conv4_3": ft}), step=0, progress=0.3)
    loss = term(step)["domain"]
    d = term.discriminator
    expected = (F.binary_cross_entropy_with_logits(d(fs), torch.zeros(2, 1, 4, 4))
                + F.binary_cross_entropy_with_logits(d(ft), torch.ones(3, 1, 4, 4))) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    g_features = fs.grad.clone()
    d_grads = [p.grad.clone() for p in d.parameters()]
    fs.grad = None
    d.zero_grad()
    expected.backward()
    assert torch.allclose(g_features, -0.7 * fs.grad, atol=1e-7)  # the features learn to fool D
    assert all(torch.allclose(a, p.grad, atol=1e-7) for a, p in zip(d_grads, d.parameters()))  # D learns


def test_dann_ganin_schedule_and_missing_tap():
    adapter = tiny_ssd_adapter()
    term = DANN()
    assert term.current_coeff(0.0) == 0.0 and term.current_coeff(1.0) == pytest.approx(ganin_coeff(1.0))
    with pytest.raises(ConfigError, match="offers: conv4_3"):
        DANN(tap="backbone.0").attach(adapter, "detection")
    with pytest.raises(ValueError, match="schedule"):
        DANN(schedule="linear")


class FakeSegmenter:
    num_classes = 4


def test_output_space_losses_and_discriminator_step():
    term = OutputSpace(ndf=4)
    term.attach(FakeSegmenter(), "segmentation")
    torch.manual_seed(0)
    model = nn.Conv2d(3, 4, 1)
    xs, xt = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32) + 1
    source, target = model(xs), model(xt)
    step = StepBatch(source=StepOutputs({}, source), target=StepOutputs({}, target), step=0, progress=0.0)
    d = term.discriminator
    adv = term(step)["adv"]
    expected = F.binary_cross_entropy_with_logits(d(target.softmax(1)), torch.zeros(2, 1, 1, 1))
    assert adv.item() == pytest.approx(expected.item(), rel=1e-6)
    d_loss = term.discriminator_losses(step)["d"]
    direct = (F.binary_cross_entropy_with_logits(d(source.detach().softmax(1)), torch.zeros(2, 1, 1, 1))
              + F.binary_cross_entropy_with_logits(d(target.detach().softmax(1)), torch.ones(2, 1, 1, 1))) / 2
    assert d_loss.item() == pytest.approx(direct.item(), rel=1e-6)
    d_loss.backward()
    assert all(p.grad is None for p in model.parameters())  # the discriminator's loss never reaches the model
    d.zero_grad()

    terms = LossTerms([WeightedTerm(key="output_space", weight=0.001, term=term)])
    terms.prepare("cpu")
    losses = terms.losses(step, "rounds")
    assert losses["output_space/adv"].item() == pytest.approx(0.001 * expected.item(), rel=1e-6)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in d.parameters())  # the model's loss leaves nothing in D ...
    assert all(p.grad is not None for p in model.parameters())  # ... and reaches the segmenter through D
    assert all(p.requires_grad for p in d.parameters())
    opt = terms.optimizers[0]["d"]
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["betas"] == (0.9, 0.99)
    assert opt.defaults["lr"] == 1e-4
    (update,) = terms.updates[0]
    assert terms.phase_optimizers("rounds") == [opt] and set(update.loss(step)) == {"d"}


def one_step(terms: LossTerms, step: StepBatch, phase: str) -> DiscriminatorUpdate:
    """One step runner step on a model-free step function: the terms' losses, then the discriminators."""
    hook = DiscriminatorUpdate(terms, phase)
    dummy = nn.Parameter(torch.zeros(()))
    opt = torch.optim.SGD([dummy], lr=0.0)
    runner = StepRunner(optimizer=opt, scheduler=make_scheduler(opt, "constant", 1), hooks=[hook])
    runner.step(lambda i: StepResult({**terms.losses(step, phase), "dummy": dummy * 0}, step), 0)
    return hook


def test_output_space_step_equals_one_adam_step_on_the_discriminator_loss_alone():
    torch.manual_seed(0)
    term = OutputSpace(ndf=4)
    term.attach(FakeSegmenter(), "segmentation")
    twin = OutputSpace(ndf=4)
    twin.attach(FakeSegmenter(), "segmentation")
    twin.load_state_dict(term.state_dict())
    source, target = torch.randn(2, 4, 32, 32), torch.randn(2, 4, 32, 32)
    step = StepBatch(source=StepOutputs({}, source), target=StepOutputs({}, target.requires_grad_()), step=0,
                     progress=0.0)
    terms = LossTerms([WeightedTerm(key="os", weight=1.0, term=term)])
    terms.prepare("cpu")
    hook = one_step(terms, step, "rounds")
    assert set(hook.meter.means(1)) == {"os/d", "os/adv_raw", "os/acc_src", "os/acc_tgt"}
    opt = torch.optim.Adam(twin.parameters(), lr=1e-4, betas=(0.9, 0.99))
    twin.discriminator_losses(step)["d"].backward()
    opt.step()
    for a, b in zip(term.parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-7)


def test_loss_terms_weight_once_respect_phases_and_round_trip_state():
    adapter = tiny_ssd_adapter()
    term = DANN(hidden=4, schedule="constant")
    term.attach(adapter, "detection")
    c = adapter.feature_channels()["conv4_3"]
    step = StepBatch(source=StepOutputs({}, torch.zeros(1), {"conv4_3": features(0, (1, c, 3, 3))}),
                     target=StepOutputs({}, torch.zeros(1), {"conv4_3": features(1, (1, c, 3, 3))}),
                     step=0, progress=1.0)
    terms = LossTerms([WeightedTerm(key="dann", weight=0.25, term=term, phases=("source",))])
    terms.prepare("cpu")
    assert terms.needs("source") == {"source", "target"} and terms.needs("rounds") == set()
    assert terms.losses(step, "rounds") == {}
    weighted = terms.losses(step, "source")["dann/domain"]
    assert weighted.item() == pytest.approx(0.25 * term(step)["domain"].item(), rel=1e-6)
    before = [p.detach().clone() for p in term.parameters()]
    logged = one_step(terms, step, "source").meter.means(1)  # a GRL term has no losses of its own
    assert set(logged) == {"dann/domain_raw", "dann/acc_src", "dann/acc_tgt"}
    assert logged["dann/domain_raw"] == pytest.approx(weighted.item() / 0.25, rel=1e-6)
    assert all(not torch.equal(b, p) for b, p in zip(before, term.parameters()))  # but its D stepped
    state = terms.state_dict()
    other = DANN(hidden=4, schedule="constant")
    other.attach(adapter, "detection")
    copy = LossTerms([WeightedTerm(key="dann", weight=0.25, term=other, phases=("source",))])
    copy.prepare("cpu")
    copy.load_state_dict(state)
    for a, b in zip(term.parameters(), other.parameters()):
        assert torch.equal(a, b)
    assert copy.optimizers[0]["d"].state_dict()["state"].keys() == terms.optimizers[0]["d"].state_dict()["state"].keys()


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_registered_loss_builds_with_its_defaults(name):
    term = create_loss(name)
    assert term.tasks and term.needs <= {"source", "target", "target_images"}
    with pytest.raises(ValueError, match="unknown optim key"):
        create_loss(name, optim={"learning_rate": 1.0})


def test_ssd300_reverses_the_gradient_after_relu4_3():
    from selftrain.adapters import ADAPTERS

    adapter = ADAPTERS.get("ssd300_vgg16")(num_classes=3)
    features = adapter.model.backbone.features
    end = adapter.trunk_end()
    assert end is features[-1] and isinstance(end, nn.ReLU)
    convs = [m for m in features if isinstance(m, nn.Conv2d)]
    assert len(convs) == 10 and convs[-1].out_channels == 512  # conv1_1 ... conv4_3
    assert adapter.feature_channels() == {"conv4_3": 512}
