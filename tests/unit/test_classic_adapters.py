"""The CBST-paper segmenters (adapters/classic.py): real sizes, structure, frozen BN, local weights, overfitting."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
import torchvision

from selftrain.adapters import classic, create_adapter
from selftrain.adapters.resnet38 import ResNet38
from selftrain.errors import ConfigError, DataError

SMALL = {"deeplabv2": {"depth": 50}, "fcn8s_vgg16": {"width": 64}, "fcn_resnet50": {}, "fcn_resnet101": {},
         "resnet38": {"width_multiplier": 0.125}}
# dilated ResNet-50/101 trunks and FCN-8s on the full VGG-16 conv trunk (16 M parameters at width 64):
# seconds each on 2 cores when quiet, tens of seconds when the machine is shared
HEAVY = {"deeplabv2", "fcn_resnet50", "fcn_resnet101", "fcn8s_vgg16"}


def documented_counts() -> dict[str, int]:
    """The 'measured' column of the table in adapters/classic.py's docstring."""
    rows = re.findall(r"^(\w+)\s+([\d,]{9,})\s", classic.__doc__, flags=re.MULTILINE)
    return {name: int(count.replace(",", "")) for name, count in rows}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def bn_layers(module: torch.nn.Module) -> list[torch.nn.BatchNorm2d]:
    return [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def test_the_docstring_table_lists_every_classic_adapter():
    assert sorted(documented_counts()) == sorted(SMALL)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_full_size_models_have_the_documented_parameter_count(name):
    with torch.device("meta"):  # real shapes, no memory, no initialisation cost
        adapter = create_adapter(name, num_classes=19)
    assert n_params(adapter.model) == pytest.approx(documented_counts()[name], rel=1e-3)


def test_documented_breakdowns_hold():
    with torch.device("meta"):
        deeplab = create_adapter("deeplabv2", num_classes=19).model
        rn38 = create_adapter("resnet38", num_classes=19).model
    assert n_params(deeplab.backbone) == 44_549_160 - (2048 * 1000 + 1000)  # torchvision ResNet-101 minus fc
    assert n_params(deeplab.classifier) == 4 * 350_227
    assert n_params(rn38.backbone) == pytest.approx(105.07e6, rel=1e-4)
    assert n_params(rn38.classifier) == pytest.approx(18.96e6, rel=1e-3)


def test_documented_published_reference_counts_are_reproducible():
    # torchvision's published FCN sizes (21 classes with the aux head) come out of the same builders
    for name, published in (("fcn_resnet50", 35_322_218), ("fcn_resnet101", 54_314_346)):
        with torch.device("meta"):
            net = getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None,
                                                                 num_classes=21, aux_loss=True)
        assert n_params(net) == published


def test_deeplabv2_aspp_sums_four_dilated_branches():
    aspp = create_adapter("deeplabv2", num_classes=19, depth=50).model.classifier
    assert [conv.dilation[0] for conv in aspp.branches] == [6, 12, 18, 24]
    assert [conv.padding[0] for conv in aspp.branches] == [6, 12, 18, 24]
    assert all(conv.in_channels == 2048 and conv.out_channels == 19 and conv.kernel_size == (3, 3)
               for conv in aspp.branches)
    assert all(abs(conv.weight.std().item() - 0.01) < 1e-3 and not conv.bias.any() for conv in aspp.branches)
    features = torch.randn(1, 2048, 5, 7)
    with torch.no_grad():
        assert torch.allclose(aspp(features), sum(conv(features) for conv in aspp.branches), atol=1e-5)


def test_deeplabv2_has_output_stride_8():
    model = create_adapter("deeplabv2", num_classes=19, depth=50).model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 19, 8, 8)


def test_resnet38_has_output_stride_8():
    model = create_adapter("resnet38", num_classes=19, width_multiplier=0.125).model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 19, 8, 8)


def test_fcn8s_fuses_pool4_and_pool3_scores_at_stride_8():
    torch.manual_seed(0)
    model = create_adapter("fcn8s_vgg16", num_classes=5, width=64).model.eval()
    for score in (model.score_fr, model.score_pool4, model.score_pool3):
        torch.nn.init.normal_(score.weight, 0.0, 0.1)
    seen = {}
    for name in ("score_fr", "score_pool4", "score_pool3"):
        getattr(model, name).register_forward_hook(lambda m, i, out, name=name: seen.__setitem__(name, out))
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 64, 96))
    assert seen["score_fr"].shape[-2:] == (2, 3) and seen["score_pool4"].shape[-2:] == (4, 6)
    assert logits.shape == seen["score_pool3"].shape == (1, 5, 8, 12)
    up = lambda x, like: F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)
    fr, pool4, pool3 = seen["score_fr"], seen["score_pool4"], seen["score_pool3"]
    fused = up(up(fr, pool4) + pool4, pool3) + pool3
    assert torch.allclose(logits, fused, atol=1e-5)
    assert seen["score_pool3"].abs().sum() > 0 and seen["score_pool4"].abs().sum() > 0


def train_step(adapter) -> None:
    opt = torch.optim.SGD([p for p in adapter.parameters() if p.requires_grad], lr=0.1)
    adapter.forward_train(torch.randn(2, 3, 32, 32) * 3 + 1, torch.randint(0, 3, (2, 32, 32))).losses["ce"].backward()
    opt.step()


def bn_state(adapter) -> list[torch.Tensor]:
    return [t.clone() for bn in bn_layers(adapter.model) for t in (*bn.parameters(), *bn.buffers())]


@pytest.mark.parametrize("name", ["deeplabv2", "resnet38"])
def test_freeze_bn_keeps_batchnorm_fixed_through_a_train_step(name):
    torch.manual_seed(0)
    adapter = create_adapter(name, num_classes=3, **SMALL[name])
    before = bn_state(adapter)
    train_step(adapter)
    assert adapter.model.training and not any(bn.training for bn in bn_layers(adapter.model))
    assert all(torch.equal(a, b) for a, b in zip(bn_state(adapter), before, strict=True))
    assert not any(p.requires_grad for bn in bn_layers(adapter.model) for p in bn.parameters())


def test_without_freeze_bn_a_train_step_moves_the_batchnorm_statistics():
    torch.manual_seed(0)  # the control that shows the frozen check above can fail
    adapter = create_adapter("resnet38", num_classes=3, freeze_bn=False, width_multiplier=0.125)
    before = bn_state(adapter)
    train_step(adapter)
    assert not all(torch.equal(a, b) for a, b in zip(bn_state(adapter), before, strict=True))


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory):
    reference = torchvision.models.resnet50()
    path = tmp_path_factory.mktemp("weights") / "resnet50.pth"
    torch.save(reference.state_dict(), path)
    return path, reference


@pytest.mark.parametrize("name", ["deeplabv2", "fcn_resnet50"])
def test_resnet_backbone_weights_come_from_a_local_torchvision_file(name, resnet50_file):
    path, reference = resnet50_file
    backbone = create_adapter(name, num_classes=3, backbone_weights=str(path), **SMALL[name]).model.backbone
    assert torch.equal(backbone.conv1.weight, reference.conv1.weight)
    assert torch.equal(backbone.layer4[2].conv3.weight, reference.layer4[2].conv3.weight)
    assert torch.equal(backbone.bn1.running_var, reference.bn1.running_var)


def test_vgg16_weights_fill_features_and_fc6_fc7(tmp_path):
    width = 64  # torchvision's layout with a narrow classifier; width 4096 is the same code path
    state = {f"features.{k}": v for k, v in torchvision.models.vgg16().features.state_dict().items()}
    fc6, fc7 = torch.nn.Linear(512 * 7 * 7, width), torch.nn.Linear(width, width)
    state.update({"classifier.0.weight": fc6.weight, "classifier.0.bias": fc6.bias,
                  "classifier.3.weight": fc7.weight, "classifier.3.bias": fc7.bias,
                  "classifier.6.weight": torch.zeros(1000, width), "classifier.6.bias": torch.zeros(1000)})
    torch.save(state, tmp_path / "vgg16.pth")
    model = create_adapter("fcn8s_vgg16", num_classes=3, width=width,
                           backbone_weights=str(tmp_path / "vgg16.pth")).model
    assert torch.equal(model.features[28].weight, state["features.28.weight"])
    assert torch.equal(model.classifier[3].weight.flatten(1), fc7.weight)
    pool5 = torch.randn(1, 512, 7, 7)  # fc6 at the centre of a 7x7 map is torchvision's Linear on flatten
    with torch.no_grad():
        assert torch.allclose(model.classifier[0](pool5)[0, :, 3, 3], fc6(pool5.flatten(1))[0], atol=1e-4)


def test_resnet38_weights_load_by_their_converted_names(tmp_path):
    reference = ResNet38(width_multiplier=0.125)
    assert "b4_3.conv_branch2b1.weight" in reference.state_dict() and "bn7.running_var" in reference.state_dict()
    torch.save(reference.state_dict(), tmp_path / "rn38.pth")
    model = create_adapter("resnet38", num_classes=3, width_multiplier=0.125,
                           backbone_weights=str(tmp_path / "rn38.pth")).model
    assert torch.equal(model.backbone.b4_3.conv_branch2b1.weight, reference.b4_3.conv_branch2b1.weight)
    assert torch.equal(model.backbone.b7.conv_branch1.weight, reference.b7.conv_branch1.weight)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_a_missing_weights_file_is_an_error_not_a_download(name, tmp_path):
    with pytest.raises(DataError, match="never downloads"):
        create_adapter(name, num_classes=3, backbone_weights=str(tmp_path / "absent.pth"), **SMALL[name])


def test_bad_sizes_are_config_errors_that_name_the_choices():
    with pytest.raises(ConfigError, match="depth=34 .* choose one of 50, 101, 152"):
        create_adapter("deeplabv2", num_classes=3, depth=34)
    with pytest.raises(ConfigError, match="width_multiplier=0 must be positive"):
        create_adapter("resnet38", num_classes=3, width_multiplier=0)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in sorted(SMALL)])
def test_small_model_overfits_one_batch(name):
    torch.manual_seed(0)
    adapter = create_adapter(name, num_classes=3, **SMALL[name])
    targets = torch.randint(0, 3, (2, 4, 4)).repeat_interleave(8, 1).repeat_interleave(8, 2)
    images = F.one_hot(targets, 3).permute(0, 3, 1, 2).float() + 0.3 * torch.randn(2, 3, 32, 32)
    opt = torch.optim.Adam([p for p in adapter.parameters() if p.requires_grad], lr=1e-3)
    first = adapter.forward_train(images, targets).losses["ce"].item()
    for _ in range(60):  # stops as soon as the loss is below 20 % of its start: seconds, not minutes
        loss = adapter.forward_train(images, targets).losses["ce"]
        if loss.item() < 0.2 * first:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first
