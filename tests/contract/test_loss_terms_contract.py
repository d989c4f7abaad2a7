"""Every registered loss term: it builds for a tiny model of its task, refuses the other task, and
returns named, finite, unweighted losses whose gradient reaches the model (and, for a term with its
own discriminator update, its discriminator and not the model)."""

from __future__ import annotations

import pytest
import torch

from selftrain.adapters import create_adapter
from selftrain.errors import ConfigError
from selftrain.losses import LOSSES, DiscriminatorUpdate, LossTerms, WeightedTerm, create_loss
from selftrain.training import StepResult, StepRunner, make_scheduler
from selftrain.types import StepBatch

TASKS = ("segmentation", "detection")
NEEDS = {"source", "target", "target_images"}


def tiny_adapter(task: str):
    torch.manual_seed(0)
    if task == "detection":
        return create_adapter("tiny_ssd", num_classes=3, size=64, width=16)
    return create_adapter("tiny_seg", num_classes=4, width=8)


def step_batch(adapter, task: str, needs: frozenset[str]) -> StepBatch:
    """The step's forward outputs of each domain as the step runner hands them over."""
    gen = torch.Generator().manual_seed(1)
    if task == "detection":
        source = [torch.rand(3, 64, 64, generator=gen) for _ in range(2)]
        target = [torch.rand(3, 64, 64, generator=gen) for _ in range(2)]
        labels = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
                  {"boxes": torch.tensor([[20.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([3])}]
    else:
        source, target = torch.randn(2, 3, 32, 32, generator=gen), torch.randn(2, 3, 32, 32, generator=gen)
        labels = torch.randint(0, 4, (2, 32, 32), generator=gen)
    return StepBatch(source=adapter.forward_train(source, labels) if "source" in needs else None,
                     target=adapter.forward_train(target) if "target" in needs else None,
                     step=3, progress=0.4, adapter=adapter, target_images=target if "target_images" in needs else None)


def model_gradient(adapter) -> float:
    return sum(float(p.grad.abs().sum()) for p in adapter.parameters() if p.grad is not None)


@pytest.fixture(params=LOSSES.names())
def term_and_task(request):
    term = create_loss(request.param)
    assert term.name == request.param and term.tasks and set(term.tasks) <= set(TASKS)
    return term, term.tasks[0]


def test_the_registry_holds_the_adversarial_terms():
    assert LOSSES.names() == ["bsr", "dann", "output_space"]


def test_a_term_refuses_the_other_task(term_and_task):
    term, _ = term_and_task
    for task in set(TASKS) - set(term.tasks):
        with pytest.raises(ConfigError, match=f"works for .*not {task}"):
            term.attach(tiny_adapter(task), task)


def test_a_term_on_its_task_is_finite_and_trains_the_model(term_and_task):
    term, task = term_and_task
    adapter = tiny_adapter(task)
    term.attach(adapter, task)
    assert set(term.needs) <= NEEDS and term.needs
    losses = term(step_batch(adapter, task, term.needs))
    assert losses and all(isinstance(k, str) and k and "/" not in k for k in losses)
    for name, value in losses.items():
        assert value.shape == () and bool(torch.isfinite(value)) and value.requires_grad, name
    sum(losses.values()).backward()
    assert model_gradient(adapter) > 0
    own = [p for p in term.parameters() if p.requires_grad]
    if term.separate_discriminator:  # its discriminator learns only from discriminator_losses
        assert all(p.grad is None or not p.grad.any() for p in own)
    updates = term.updates()
    assert len({u.name for u in updates}) == len(updates) and bool(updates) == bool(own)
    assert sorted(id(p) for u in updates for p in u.params) == sorted(id(p) for p in own)  # each in one update
    for u in updates:
        if u.loss is None:  # it steps on the model's backward: that backward reached it
            assert all(p.grad is not None for p in u.params), u.name
        assert isinstance(u.make_optimizer(), torch.optim.Optimizer)


def test_a_separate_discriminator_learns_from_detached_outputs(term_and_task):
    term, task = term_and_task
    adapter = tiny_adapter(task)
    term.attach(adapter, task)
    step = step_batch(adapter, task, term.needs)
    d_losses = term.discriminator_losses(step)
    if not term.separate_discriminator:
        assert d_losses == {}
        return
    assert d_losses and all(bool(torch.isfinite(v)) and v.shape == () for v in d_losses.values())
    sum(d_losses.values()).backward()
    assert model_gradient(adapter) == 0  # the model's outputs were detached
    assert sum(float(p.grad.abs().sum()) for p in term.parameters() if p.grad is not None) > 0


def test_a_term_runs_through_the_step_hook_and_its_state_round_trips(term_and_task):
    """One step runner step with the terms' hook: every update steps its parameters, the logs name
    the raw losses, and the container's state (parameters and every optimiser) loads into a twin."""
    term, task = term_and_task
    adapter = tiny_adapter(task)
    term.attach(adapter, task)
    terms = LossTerms([WeightedTerm(key=term.name, weight=0.5, term=term)])
    terms.prepare("cpu")
    before = [p.detach().clone() for p in term.parameters()]
    opt = torch.optim.SGD(adapter.parameters(), lr=1e-3)
    hook = DiscriminatorUpdate(terms, "source")
    runner = StepRunner(optimizer=opt, scheduler=make_scheduler(opt, "constant", 1), hooks=[hook])
    step = step_batch(adapter, task, term.needs)
    runner.step(lambda i: StepResult(terms.losses(step, "source"), step), 0)
    assert all(not torch.equal(b, p) for b, p in zip(before, term.parameters()))
    logged = hook.meter.means(1)
    assert {f"{term.name}/{k}_raw" for k in term(step)} <= logged.keys()
    twin = create_loss(term.name)
    twin.attach(tiny_adapter(task), task)
    copy = LossTerms([WeightedTerm(key=term.name, weight=0.5, term=twin)])
    copy.prepare("cpu")
    copy.load_state_dict(terms.state_dict())
    for a, b in zip(term.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    for name, o in terms.optimizers[0].items():
        assert copy.optimizers[0][name].state_dict()["state"].keys() == o.state_dict()["state"].keys()


def test_a_term_state_round_trips(term_and_task):
    term, task = term_and_task
    term.attach(tiny_adapter(task), task)
    clone = create_loss(term.name)
    clone.attach(tiny_adapter(task), task)
    clone.load_state_dict(term.state_dict())
    for key, value in term.state_dict().items():
        assert torch.equal(clone.state_dict()[key], value), key
