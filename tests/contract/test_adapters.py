"""Every registered adapter honours the contract the engine relies on (smp's BaseModelTester style)."""

from __future__ import annotations

import pytest
import torch

from selftrain.adapters import ADAPTERS, create_adapter
from selftrain.errors import DataError
from selftrain.training import OptimSpec, make_optimizer, parameter_groups
from selftrain.types import SegPrediction, StepOutputs

SMALL = {"smp_deeplabv3plus": {"encoder": "resnet18"}, "smp_deeplabv3": {"encoder": "resnet18"},
         "smp_fpn": {"encoder": "resnet18"}, "smp_unet": {"encoder": "resnet18"}, "tiny_seg": {},
         "deeplabv2": {"depth": 50}, "fcn8s_vgg16": {"width": 64}, "fcn_resnet50": {}, "fcn_resnet101": {},
         "resnet38": {"width_multiplier": 0.125}}


# detectors have their own contract (tests/contract/test_det_adapters.py)
SEGMENTERS = ADAPTERS.names(task="segmentation")
# full-size only (no small option); fcn_resnet50 covers the same code in the fast suite
SLOW = {"fcn_resnet101"}


def test_every_segmenter_has_a_small_configuration():
    assert sorted(SMALL) == SEGMENTERS


@pytest.fixture(params=[pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in SEGMENTERS])
def name(request):
    return request.param


@pytest.fixture
def adapter(name):
    torch.manual_seed(0)
    return create_adapter(name, num_classes=5, **SMALL[name])


def test_predict_returns_logits_at_input_size(adapter):
    images = torch.randn(2, 3, 64, 96)
    pred = adapter.predict(images)
    assert isinstance(pred, SegPrediction) and pred.logits.shape == (2, 5, 64, 96)
    assert not pred.logits.requires_grad and not adapter.model.training


def test_forward_train_gives_named_losses_and_gradients(adapter):
    images, targets = torch.randn(2, 3, 64, 96), torch.randint(0, 5, (2, 64, 96))
    targets[0, :10] = 255
    out = adapter.forward_train(images, targets)
    assert isinstance(out, StepOutputs) and set(out.losses) == {"ce"} and adapter.model.training
    assert torch.isfinite(out.losses["ce"]) and out.logits.shape == (2, 5, 64, 96)
    out.losses["ce"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())


def test_all_ignored_targets_give_zero_loss_with_a_graph(adapter):
    out = adapter.forward_train(torch.randn(2, 3, 64, 96), torch.full((2, 64, 96), 255))
    assert out.losses["ce"].item() == 0.0
    out.losses["ce"].backward()


def test_state_dict_round_trip(name, adapter):
    other = create_adapter(name, num_classes=5, **SMALL[name])
    other.load_state_dict(adapter.state_dict())
    images = torch.randn(1, 3, 64, 96)
    assert torch.allclose(other.predict(images).logits, adapter.predict(images).logits, atol=1e-5)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    adapter = create_adapter("tiny_seg", num_classes=3)
    targets = torch.randint(0, 3, (2, 4, 4)).repeat_interleave(8, 1).repeat_interleave(8, 2)
    images = torch.nn.functional.one_hot(targets, 3).permute(0, 3, 1, 2).float() + 0.3 * torch.randn(2, 3, 32, 32)
    opt = torch.optim.Adam(adapter.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        loss = adapter.forward_train(images, targets).losses["ce"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first


def test_encoder_weights_come_from_a_local_file_only(tmp_path):
    with pytest.raises(DataError, match="never downloads"):
        create_adapter("smp_unet", num_classes=3, encoder="resnet18", encoder_weights=str(tmp_path / "none.pth"))
    import torchvision

    path = tmp_path / "resnet18.pth"
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), path)
    adapter = create_adapter("smp_unet", num_classes=3, encoder="resnet18", encoder_weights=str(path))
    assert torch.equal(adapter.model.encoder.conv1.weight, reference.conv1.weight)
    torch.save({"unrelated": torch.zeros(3)}, path)
    with pytest.raises(DataError, match="matches none"):
        create_adapter("smp_unet", num_classes=3, encoder="resnet18", encoder_weights=str(path))


# --------------------------------------------------------------------------- head learning rate


@pytest.mark.parametrize("name, options", [("tiny_seg", {}), ("deeplabv2", {"depth": 50}),
                                           ("smp_unet", {"decoder_channels": [16, 16, 16, 16, 16]})])
def test_head_trains_at_its_multiple_of_the_learning_rate(name, options):
    """DeepLab-v2 / AdaptSegNet: the classifier at 10x. One plain SGD step moves the head by
    10 x lr x grad and the body by lr x grad."""
    torch.manual_seed(0)
    adapter = create_adapter(name, num_classes=4, **options)
    adapter.model.double()  # float64: the update equals lr x grad to rounding
    head = adapter.head_parameters()
    groups = parameter_groups(adapter, 10.0)
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in head} and groups[1]["lr_mult"] == 10.0
    assert len(groups[0]["params"]) + len(head) == len(list(adapter.parameters()))
    assert len(parameter_groups(adapter, 1.0)) == 1
    optimizer = make_optimizer(groups, OptimSpec(name="sgd", lr=1e-3, momentum=0.0, weight_decay=0.0))
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-2]
    before = [p.detach().clone() for p in adapter.parameters()]
    images, labels = torch.rand(2, 3, 64, 64, dtype=torch.float64), torch.randint(0, 4, (2, 64, 64))
    adapter.forward_train(images, labels).losses["ce"].backward()
    grads = [None if p.grad is None else p.grad.clone() for p in adapter.parameters()]
    optimizer.step()
    ids = {id(p) for p in head}
    for p, b, g in zip(adapter.parameters(), before, grads):
        if g is not None:
            torch.testing.assert_close(b - p.detach(), (1e-2 if id(p) in ids else 1e-3) * g, rtol=1e-6, atol=1e-12)


def test_models_without_a_head_refuse_a_head_learning_rate():
    with pytest.raises(ValueError, match="no separate head"):
        parameter_groups(create_adapter("fcn8s_vgg16", num_classes=4, width=8), 10.0)
    with pytest.raises(ValueError, match="no separate head"):
        parameter_groups(create_adapter("tiny_ssd", num_classes=4, width=16), 10.0)
