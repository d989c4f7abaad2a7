"""ResNet-38, the wide pre-activation ResNet "model A1" of Wu, Shen & van den Hengel (arXiv:1611.10080).

This is the segmenter CBST (Zou et al., ECCV 2018) trains on GTA5/SYNTHIA -> Cityscapes: the
``fcrna_model_a1`` network of the authors' MXNet code at output stride 8. The layout, for an input
[B, 3, H, W] (``w`` = ``width_multiplier``; every channel count below is multiplied by it):

==========  ====================================  ======  ========  =======
stage       blocks (convs: kernel/channels)       stride  dilation  output
==========  ====================================  ======  ========  =======
conv1a      3x3, 64                               1       1         H
b2          3 x [3x3 128, 3x3 128]                2       1         H/2
b3          3 x [3x3 256, 3x3 256]                2       1         H/4
b4          6 x [3x3 512, 3x3 512]                2       1         H/8
b5          3 x [3x3 512, 3x3 1024]               1       2         H/8
b6          1 x [1x1 512, 3x3 1024, 1x1 2048]     1       4         H/8
b7          1 x [1x1 1024, 3x3 2048, 1x1 4096]    1       4         H/8
bn7, relu   -> features [B, 4096, H/8, W/8]
head        3x3 512 dil 12 + ReLU, 3x3 C dil 12   1       12        H/8
==========  ====================================  ======  ========  =======

Blocks are pre-activation (BN-ReLU-conv); the first block of a stage projects the shortcut with a
1x1 conv on the pre-activated input, and the first 3x3 of b5 keeps dilation 1 (the stride it
replaces). b6 and b7 apply dropout 0.3 and 0.5 before their last 1x1 conv, as CBST does.
Parameter and buffer names follow the public MXNet -> PyTorch conversion of these weights
(``b4_3.conv_branch2b1.weight``, ``bn7.running_var``), so such a state dict loads directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv(cin: int, cout: int, kernel: int, *, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    padding = dilation * (kernel // 2)
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, bias=False)


class WideBlock(nn.Module):
    """Pre-activation block of two 3x3 convs: [B, cin, H, W] -> [B, cout, H/stride, W/stride]."""

    def __init__(self, cin: int, mid: int, cout: int, *, stride: int = 1, dilation: int = 1,
                 first_dilation: int | None = None) -> None:
        super().__init__()
        first = dilation if first_dilation is None else first_dilation
        self.bn_branch2a = nn.BatchNorm2d(cin)
        self.conv_branch2a = _conv(cin, mid, 3, stride=stride, dilation=first)
        self.bn_branch2b1 = nn.BatchNorm2d(mid)
        self.conv_branch2b1 = _conv(mid, cout, 3, dilation=dilation)
        self.conv_branch1 = None if cin == cout and stride == 1 else _conv(cin, cout, 1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn_branch2a(x))
        shortcut = x if self.conv_branch1 is None else self.conv_branch1(pre)
        out = self.conv_branch2a(pre)
        out = self.conv_branch2b1(F.relu(self.bn_branch2b1(out)))
        return shortcut + out


class BottleneckBlock(nn.Module):
    """Pre-activation 1x1-3x3-1x1 block with a projected shortcut: [B, cin, H, W] -> [B, cout, H, W]."""

    def __init__(self, cin: int, cout: int, *, dilation: int, dropout: float) -> None:
        super().__init__()
        self.bn_branch2a = nn.BatchNorm2d(cin)
        self.conv_branch2a = _conv(cin, cout // 4, 1)
        self.bn_branch2b1 = nn.BatchNorm2d(cout // 4)
        self.conv_branch2b1 = _conv(cout // 4, cout // 2, 3, dilation=dilation)
        self.bn_branch2b2 = nn.BatchNorm2d(cout // 2)
        self.dropout = nn.Dropout(dropout)
        self.conv_branch2b2 = _conv(cout // 2, cout, 1)
        self.conv_branch1 = _conv(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn_branch2a(x))
        out = self.conv_branch2a(pre)
        out = self.conv_branch2b1(F.relu(self.bn_branch2b1(out)))
        out = self.conv_branch2b2(self.dropout(F.relu(self.bn_branch2b2(out))))
        return self.conv_branch1(pre) + out


def _stage(name: str, count: int, first: WideBlock, make_rest) -> list[tuple[str, nn.Module]]:
    return [(name, first)] + [(f"{name}_{i}", make_rest()) for i in range(1, count)]


class ResNet38(nn.Module):
    """ResNet-38 features at output stride 8: images [B, 3, H, W] -> [B, 4096*w, ceil(H/8), ceil(W/8)]."""

    def __init__(self, *, width_multiplier: float = 1.0) -> None:
        super().__init__()
        c = {n: max(4, round(n * width_multiplier)) for n in (64, 128, 256, 512, 1024, 2048, 4096)}
        self.out_channels = c[4096]
        self.conv1a = _conv(3, c[64], 3)
        blocks = (
            _stage("b2", 3, WideBlock(c[64], c[128], c[128], stride=2), lambda: WideBlock(c[128], c[128], c[128]))
            + _stage("b3", 3, WideBlock(c[128], c[256], c[256], stride=2), lambda: WideBlock(c[256], c[256], c[256]))
            + _stage("b4", 6, WideBlock(c[256], c[512], c[512], stride=2), lambda: WideBlock(c[512], c[512], c[512]))
            + _stage("b5", 3, WideBlock(c[512], c[512], c[1024], dilation=2, first_dilation=1),
                     lambda: WideBlock(c[1024], c[512], c[1024], dilation=2))
            + [("b6", BottleneckBlock(c[1024], c[2048], dilation=4, dropout=0.3)),
               ("b7", BottleneckBlock(c[2048], c[4096], dilation=4, dropout=0.5))]
        )
        self.block_names = [name for name, _ in blocks]
        for name, block in blocks:
            self.add_module(name, block)
        self.bn7 = nn.BatchNorm2d(c[4096])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1a(x)
        for name in self.block_names:
            x = getattr(self, name)(x)
        return F.relu(self.bn7(x))


class ResNet38Head(nn.Sequential):
    """CBST's classifier on ResNet-38: 3x3 conv (512, dilation 12) + ReLU, then 3x3 conv to C (dilation 12)."""

    def __init__(self, in_channels: int, num_classes: int, *, channels: int = 512) -> None:
        super().__init__(
            nn.Conv2d(in_channels, channels, 3, padding=12, dilation=12),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, num_classes, 3, padding=12, dilation=12),
        )
        nn.init.normal_(self[2].weight, 0.0, 0.01)
        nn.init.zeros_(self[2].bias)
