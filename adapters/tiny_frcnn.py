"""A tiny Faster R-CNN without batch norm, for tests and the CPU alignment benchmark.

The adaptive Faster R-CNN papers (DA Faster R-CNN, SWDA, SCDA, HTCN, iFAN) run VGG-16, which has
no normalisation layers, so a target batch moves no statistics there. A small detector with
BatchNorm would add that effect (worth 13 mAP on ``synth_shapes`` with ``tiny_ssd``) to every
alignment row; this one has none by construction: plain or GroupNorm convolutions, no buffers in
the backbone, and torchvision's RPN, RoIAlign and box head (Ren et al., NeurIPS 2015,
arXiv:1506.01497), run by :class:`FasterRCNNAdapter`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FasterRCNN, FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

from selftrain.errors import ConfigError
from selftrain.types import Tap

from .detection import FasterRCNNAdapter, srrs_option
from .registry import ADAPTERS
from .taps import TapTable, unlabelled_option

NORMS = ("group", "none")
STAGES = (2, 2, 3, 3)  # convolutions per stage, as VGG-16's conv1..conv4


class TinyVGG(nn.Module):
    """VGG-16's first four stages at a fraction of the width: 3x3 conv (+ GroupNorm(8)) + ReLU,
    max-pool after stages 1-3, none after stage 4 (stride 8, the map of the RPN and RoIAlign).

    ``features`` is one ``nn.Sequential`` whose entries are single layers named like VGG's; at
    width w the stages have w, 2w, 4w, 8w channels. Output: {"0": [B, 8w, H / 8, W / 8]}.
    """

    def __init__(self, width: int = 16, norm: str = "group") -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        cin = 3
        for stage, convs in enumerate(STAGES, start=1):
            cout = width * 2 ** (stage - 1)
            for i in range(1, convs + 1):
                layers[f"conv{stage}_{i}"] = nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none")
                if norm == "group":
                    layers[f"gn{stage}_{i}"] = nn.GroupNorm(min(8, cout), cout)
                layers[f"relu{stage}_{i}"] = nn.ReLU(inplace=True)
                cin = cout
            if stage < len(STAGES):
                layers[f"pool{stage}"] = nn.MaxPool2d(2, 2)
        self.features = nn.Sequential(layers)
        self.out_channels = cin
        for conv in self.features:
            if isinstance(conv, nn.Conv2d):
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                if conv.bias is not None:
                    nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return OrderedDict([("0", self.features(x))])


def tiny_taps(width: int) -> list[tuple[Tap, str]]:
    """The VGG tap names that exist in :class:`TinyVGG` (pool4 and conv5 do not), with relu4_3, the
    last map, in the role of VGG's relu5_3: (tap, module path in the model)."""
    table = (("pool2", 2, 4), ("relu3_2", 4, 4), ("relu3_3", 4, 4), ("pool3", 4, 8), ("relu4_2", 8, 8),
             ("relu4_3", 8, 8))
    return [(Tap(name, width * mult, stride), f"backbone.features.{name}") for name, mult, stride in table]


@ADAPTERS.register("tiny_frcnn", task="detection")
def tiny_frcnn(*, num_classes: int, size: int = 128, width: int = 16, norm: str = "group", head: int = 256,
               anchor_sizes: list[int] | None = None, rpn_post_nms: tuple[int, int] = (300, 100),
               rois_per_image: int = 128, score_thresh: float = 0.05, nms_thresh: float = 0.5,
               detections_per_img: int = 100, raw_score_thresh: float = 0.01, raw_candidates: int = 1000,
               srrs_candidates: str = "per_class", unlabelled_rois: dict[str, Any] | None = None
               ) -> FasterRCNNAdapter:
    """Faster R-CNN on :class:`TinyVGG` (stride 8), trained from scratch; no batch norm anywhere.

    Images are resized so that their shorter side is ``size`` (at most ``size`` on the longer).
    RPN: one level, anchors ``anchor_sizes`` (16/32/64 px: the objects of ``synth_shapes`` are
    10-77 px) at ratios 0.5/1/2, ``rpn_post_nms`` proposals per image (train, test; pre-NMS twice
    that). RoI head: 7x7 RoIAlign with one bilinear sample per bin (``sampling_ratio`` 1: at stride 8
a bin of an object under 56 px is smaller than a cell, and torchvision's CPU RoIAlign backward,
the largest cost of a step, takes half the time of ratio 2), two fully connected layers of ``head``, ``rois_per_image``
    sampled RoIs (25 % foreground) per labelled image. ``norm``: "group" (GroupNorm with 8 groups,
    the default: it trains from scratch without batch statistics) or "none" (VGG-16's plain
    convolutions). Taps: pool2, relu3_2, relu3_3, pool3, relu4_2, relu4_3 (= backbone.0);
    ``unlabelled_rois``, ``srrs_candidates`` as for the other Faster R-CNN adapters.
    """
    srrs_option(srrs_candidates)
    unlabelled_rois = unlabelled_option(unlabelled_rois)
    if norm not in NORMS:
        raise ConfigError(f"model.options.norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if width < 1 or size < 32:
        raise ConfigError(f"model.options.width must be >= 1 and size >= 32, got width {width}, size {size}")
    backbone = TinyVGG(width, norm)
    train_n, test_n = (int(v) for v in rpn_post_nms)
    sizes = tuple(anchor_sizes or (16, 32, 64))
    model = FasterRCNN(backbone, None, min_size=size, max_size=size,
                       rpn_anchor_generator=AnchorGenerator((sizes,), ((0.5, 1.0, 2.0),)),
                       rpn_pre_nms_top_n_train=2 * train_n, rpn_post_nms_top_n_train=train_n,
                       rpn_pre_nms_top_n_test=2 * test_n, rpn_post_nms_top_n_test=test_n,
                       box_roi_pool=MultiScaleRoIAlign(["0"], output_size=7, sampling_ratio=1),
                       box_head=TwoMLPHead(backbone.out_channels * 49, head),
                       box_predictor=FastRCNNPredictor(head, num_classes + 1), box_batch_size_per_image=rois_per_image,
                       box_score_thresh=score_thresh, box_nms_thresh=nms_thresh,
                       box_detections_per_img=detections_per_img)
    taps = TapTable(model, tiny_taps(width), model="tiny_frcnn", unfreeze="nothing in tiny_frcnn freezes its "
                    "layers; set requires_grad back to True")
    return FasterRCNNAdapter(model=model, num_classes=num_classes, raw_score_thresh=raw_score_thresh,
                             raw_candidates=raw_candidates, srrs_candidates=srrs_candidates, taps=taps,
                             unlabelled_rois=unlabelled_rois)
