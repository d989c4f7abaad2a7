"""The segmenters of the CBST paper (Zou et al., ECCV 2018, arXiv:1810.07911) and their FCN relatives.

``deeplabv2``      DeepLab-v2 (Chen et al., TPAMI 2018, arXiv:1606.00915): dilated ResNet-101 at output
                   stride 8 and the ASPP-L classifier (four 3x3 convs, dilation 6/12/18/24, summed).
``fcn8s_vgg16``    FCN-8s (Long et al., CVPR 2015, arXiv:1411.4038) on VGG-16.
``fcn_resnet50``   torchvision's FCN with a dilated ResNet-50 / ResNet-101 (output stride 8, no aux head).
``fcn_resnet101``
``resnet38``       ResNet-38 model A1 (Wu et al., arXiv:1611.10080) with CBST's dilated classifier.

Parameter counts at 19 classes (Cityscapes), measured on the full-size defaults, next to published
figures (each for the network and class count it names):

=============  ============  ===============================================================
adapter        measured      published
=============  ============  ===============================================================
deeplabv2      43,901,068    ResNet-101 44.5M with its 1000-class fc (He et al.; torchvision:
                             44,549,160), i.e. 42.50M without the fc; + ASPP-L 4 x 350,227
fcn8s_vgg16    134,353,017   FCN-VGG16 134M (Long et al., Table 1; 21 classes)
fcn_resnet50   32,955,987    torchvision FCN_ResNet50 35,322,218 (21 classes + aux head; the
                             same builder reproduces it exactly)
fcn_resnet101  51,948,115    torchvision FCN_ResNet101 54,314,346 (same configuration, reproduced)
resnet38       124,033,363   ~124M, the size quoted for CBST's ResNet-38 (not found in Wu et al.'s
                             text): 105.07M trunk + 18.96M head (3x3 4096 -> 512 at dilation 12,
                             3x3 classifier); the trunk with a 1000-way linear layer is 109.17M
=============  ============  ===============================================================

Every model returns logits at its output stride (8 here); :class:`SegmentationAdapter` upsamples
them bilinearly to the input size. Weights come only from local files (``backbone_weights``).
DeepLab-v2 trains its classifier at 10x the backbone learning rate: ``optim.head_lr_mult: 10`` in a
recipe, with the classifier of every backbone + classifier model as the adapter's head.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models import vgg

from selftrain.errors import ConfigError

from .registry import ADAPTERS
from .resnet38 import ResNet38, ResNet38Head
from .segmentation import SegmentationAdapter, load_weights

RESNETS = {50: torchvision.models.resnet50, 101: torchvision.models.resnet101,
           152: torchvision.models.resnet152}


def freeze_batchnorm(module: nn.Module) -> None:
    """Put every BatchNorm of ``module`` in eval mode and stop gradients to its affine parameters."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)


class BackboneHead(nn.Module):
    """``classifier(backbone(images))``: [B, 3, H, W] -> logits [B, C, H/s, W/s] at output stride s.

    With ``freeze_bn`` every BatchNorm stays in eval mode (running statistics unchanged, affine
    parameters frozen) even under ``train()``: DeepLab practice when batches hold 1-2 images.
    """

    def __init__(self, *, backbone: nn.Module, classifier: nn.Module, freeze_bn: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.freeze_bn = freeze_bn
        if freeze_bn:
            freeze_batchnorm(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone(images)
        if isinstance(features, dict):  # torchvision's IntermediateLayerGetter
            features = features["out"]
        return self.classifier(features)

    def train(self, mode: bool = True) -> BackboneHead:
        super().train(mode)
        if self.freeze_bn:
            freeze_batchnorm(self)
        return self


class ASPPv2(nn.Module):
    """DeepLab-v2's ASPP-L: parallel 3x3 convs ``in -> C`` at the given dilations, SUMMED (not concatenated).

    Shapes: [B, in_channels, h, w] -> [B, num_classes, h, w]. Weights N(0, 0.01) and zero biases,
    as in the released Caffe prototxt (fc1_c0..c3).
    """

    def __init__(self, in_channels: int, num_classes: int, rates: tuple[int, ...] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r) for r in rates)
        for conv in self.branches:
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(branch(x) for branch in self.branches)


def dilated_resnet(depth: int) -> nn.Sequential:
    """torchvision ResNet-``depth`` without pool/fc, layer3/4 dilated (2, 4): output stride 8, 2048 channels.

    Its state dict uses torchvision's names (``conv1.weight``, ``layer3.0.conv2.weight``). Unlike the
    Caffe DeepLab net, torchvision strides the 3x3 (not the 1x1) of layer2.0, keeps dilation 1/2 in the
    first block of layer3/layer4 and floors the max-pool: same shapes, so Caffe-converted weights load.
    """
    if depth not in RESNETS:
        raise ConfigError(f"depth={depth!r} is not a supported ResNet depth; choose one of "
                          f"{', '.join(map(str, RESNETS))} (101 is DeepLab-v2's)")
    net = RESNETS[depth](weights=None, replace_stride_with_dilation=[False, True, True])
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    return nn.Sequential(OrderedDict((name, getattr(net, name)) for name in names))


class FCN8s(nn.Module):
    """FCN-8s on VGG-16 (Long et al., CVPR 2015): [B, 3, H, W] -> logits [B, C, H/8, W/8].

    fc6/fc7 are the 7x7 and 1x1 convolutions of ``width`` channels (4096 in the paper). Instead of the
    original 100-pixel input padding and cropped deconvolutions, fc6 is padded by 3 ("same") and the
    2x and 8x steps are parameter-free bilinear interpolations to the skip map's (input's) size: the
    bilinear kernels the deconvolutions start from, which the released Caffe nets keep fixed
    (lr_mult 0). Score layers start at zero, as in the paper. ``classifier.0``/``classifier.3``
    accept torchvision's ``vgg16`` Linear weights (reshaped).
    """

    def __init__(self, *, num_classes: int, width: int = 4096) -> None:
        super().__init__()
        # torchvision's vgg16().features, without building (and initialising) its 120M-parameter classifier
        self.features = vgg.make_layers(vgg.cfgs["D"])
        self.classifier = nn.Sequential(
            nn.Conv2d(512, width, 7, padding=3), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Conv2d(width, width, 1), nn.ReLU(inplace=True), nn.Dropout(0.5),
        )
        self.score_fr = nn.Conv2d(width, num_classes, 1)
        self.score_pool4 = nn.Conv2d(512, num_classes, 1)
        self.score_pool3 = nn.Conv2d(256, num_classes, 1)
        _init_like_torchvision_vgg(self)
        for score in (self.score_fr, self.score_pool4, self.score_pool3):
            nn.init.zeros_(score.weight)
            nn.init.zeros_(score.bias)
        self.register_load_state_dict_pre_hook(_linear_to_conv)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pool3 = self.features[:17](images)  # stride 8, 256 channels
        pool4 = self.features[17:24](pool3)  # stride 16, 512 channels
        pool5 = self.features[24:](pool4)  # stride 32
        score = self.score_fr(self.classifier(pool5))
        score = _upsample_to(score, pool4) + self.score_pool4(pool4)
        return _upsample_to(score, pool3) + self.score_pool3(pool3)


def _init_like_torchvision_vgg(model: FCN8s) -> None:
    """torchvision's VGG init (Kaiming convs, fc6/fc7 N(0, 0.01)); PyTorch's default stalls 13 plain convs."""
    for conv in model.features:
        if isinstance(conv, nn.Conv2d):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
    for fc in (model.classifier[0], model.classifier[3]):
        nn.init.normal_(fc.weight, 0.0, 0.01)
        nn.init.zeros_(fc.bias)


def _upsample_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


def _linear_to_conv(module: FCN8s, state: dict[str, Any], prefix: str, *_: Any) -> None:
    """Reshape torchvision's vgg16 ``classifier.{0,3}.weight`` [out, in*k*k] into fc6/fc7 conv kernels."""
    for index in (0, 3):
        key = f"{prefix}classifier.{index}.weight"
        target = module.classifier[index].weight
        weight = state.get(key)
        if weight is not None and weight.dim() == 2 and weight.numel() == target.numel():
            state[key] = weight.reshape(target.shape)


def _adapter(model: nn.Module, num_classes: int, ignore_index: int, channels_last: bool) -> SegmentationAdapter:
    """The head is the classifier on top of the backbone (DeepLab-v2's ASPP; FCN-8s has none: its
    fc6/fc7 come from VGG and its score layers sit at three depths)."""
    head = model.classifier if isinstance(model, BackboneHead) else None
    return SegmentationAdapter(model=model, num_classes=num_classes, ignore_index=ignore_index,
                               channels_last=channels_last, head=head)


@ADAPTERS.register("deeplabv2", task="segmentation")
def deeplabv2(*, num_classes: int, ignore_index: int = 255, depth: int = 101, backbone_weights: str | None = None,
              freeze_bn: bool = True, channels_last: bool = False) -> SegmentationAdapter:
    """DeepLab-v2 with ASPP-L on a dilated ResNet (output stride 8), as used by CBST and AdaptSegNet.

    ``depth`` 101 is the paper's model; 50 (or 152) exists for quick tests. ``backbone_weights`` is a
    local ImageNet ResNet state dict with torchvision key names (torchvision's own file or the
    Caffe-converted DeepLab init); Caffe weights expect BGR, mean-subtracted 0-255 inputs.
    """
    model = BackboneHead(backbone=dilated_resnet(depth), classifier=ASPPv2(2048, num_classes),
                         freeze_bn=freeze_bn)
    if backbone_weights:
        load_weights(model.backbone, backbone_weights, f"ResNet-{depth}")
    return _adapter(model, num_classes, ignore_index, channels_last)


@ADAPTERS.register("fcn8s_vgg16", task="segmentation")
def fcn8s_vgg16(*, num_classes: int, ignore_index: int = 255, width: int = 4096, backbone_weights: str | None = None,
                channels_last: bool = False) -> SegmentationAdapter:
    """FCN-8s on VGG-16; ``width`` sets fc6/fc7 (4096 in the paper; smaller only for tests).

    ``backbone_weights``: a local torchvision ``vgg16`` state dict; ``features.*`` load as they are and
    ``classifier.0``/``classifier.3`` become fc6/fc7 (needs ``width=4096``).
    """
    model = FCN8s(num_classes=num_classes, width=width)
    if backbone_weights:
        load_weights(model, backbone_weights, "VGG-16")
    return _adapter(model, num_classes, ignore_index, channels_last)


def _register_torchvision_fcn(name: str, depth: int) -> None:
    builder = getattr(torchvision.models.segmentation, name)

    def build(*, num_classes: int, ignore_index: int = 255, backbone_weights: str | None = None,
              channels_last: bool = False) -> SegmentationAdapter:
        net = builder(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
        model = BackboneHead(backbone=net.backbone, classifier=net.classifier)
        if backbone_weights:  # IntermediateLayerGetter has no fc: the file's fc.* keys are skipped
            load_weights(model.backbone, backbone_weights, f"ResNet-{depth}")
        return _adapter(model, num_classes, ignore_index, channels_last)

    build.__doc__ = (f"torchvision FCN on a dilated ResNet-{depth} (output stride 8, no aux head); "
                     "``backbone_weights``: a local torchvision ResNet state dict.")
    ADAPTERS.register(name, task="segmentation")(build)


_register_torchvision_fcn("fcn_resnet50", 50)
_register_torchvision_fcn("fcn_resnet101", 101)


@ADAPTERS.register("resnet38", task="segmentation")
def resnet38(*, num_classes: int, ignore_index: int = 255, backbone_weights: str | None = None,
             freeze_bn: bool = True, width_multiplier: float = 1.0, channels_last: bool = False) -> SegmentationAdapter:
    """ResNet-38 (model A1) with CBST's classifier at output stride 8.

    ``width_multiplier`` scales every channel count; 1.0 is the real model (124M parameters at 19 classes),
    smaller values exist only so tests run in seconds. ``backbone_weights``: a local state dict with
    the converted MXNet names (``conv1a.weight``, ``b2.bn_branch2a.weight``, ..., ``bn7.*``).
    """
    if not width_multiplier > 0:
        raise ConfigError(f"width_multiplier={width_multiplier!r} must be positive; 1.0 is the real ResNet-38")
    backbone = ResNet38(width_multiplier=width_multiplier)
    head = ResNet38Head(backbone.out_channels, num_classes, channels=max(4, round(512 * width_multiplier)))
    model = BackboneHead(backbone=backbone, classifier=head, freeze_bn=freeze_bn)
    if backbone_weights:
        load_weights(model.backbone, backbone_weights, "ResNet-38")
    return _adapter(model, num_classes, ignore_index, channels_last)
