"""Detection adapters: torchvision SSD and Faster R-CNN, plus a tiny SSD for tests and the CPU demo.

Contract (``task = "detection"``). Builders take ``num_classes = K``, the number of object classes
*without* background, and build the network with K + 1 outputs (class 0 = background); labels are
1..K everywhere. Weights come only from local files (``backbone_weights``); nothing is downloaded.

- ``predict(images)``: eval mode, no grad; ``images`` a list of [3, H, W] tensors in [0, 1] or a
  [B, 3, H, W] tensor. One :class:`DetPrediction` per image: the post-NMS detections and the
  pre-NMS candidates that SRRS needs, all in the input image's pixels.
  ``srrs_candidates`` (every builder) picks which candidates SRRS collects supporting regions
  from (Kim et al. 2019, Algorithm 1: "O", the outputs before NMS; ``selftrain.detection``):
  - ``per_class`` (default): ``class_candidates``, the per-class lists the model's own
    post-processing hands to NMS. SSD: per class c, the default boxes decoded and clipped with
    P(c) > ``score_thresh`` (0.01), at most ``topk_candidates`` (400, torchvision's) per class.
    Faster R-CNN: per class c, every proposal's class-c box with P(c) > ``score_thresh`` (0.05),
    boxes under 0.01 px removed, no top-k (torchvision's RoI head has none). NMS of these lists is
    exactly the final detections, so each detection is supported by itself (IoU 1).
  - ``any_class``: ``class_candidates`` is None and SRRS reads ``raw_boxes`` [N, 4] /
    ``raw_probs`` [N, K + 1], which every prediction carries in both modes: the candidates whose
    highest foreground probability is at least ``raw_score_thresh`` (0.01), at most
    ``raw_candidates`` (1000), highest first. SSD: one per anchor (decoded box, clipped). Faster
    R-CNN: one per RoI-head proposal, with the class-specific box of its argmax foreground class
    (the box the detection of that class comes from, so every final detection is supported by the
    candidate that produced it, IoU 1; the class-agnostic proposal box would be an unrefined,
    worse-localised stand-in).
- ``forward_train(images, targets, *, negatives="hard", box_loss=True)``: train mode. ``targets``:
  one {"boxes": float [M, 4], "labels": int64 [M]} per image, M may be 0; ``None`` gives no task
  losses (logits and feature taps only, for alignment terms). Losses are named and unweighted:
  SSD {"cls", "box"}, Faster R-CNN {"rpn_cls", "rpn_box", "roi_cls", "roi_box"}; with
  ``box_loss=False`` (WST pseudo-labels carry no box regression) the box losses are exactly 0
  with a graph. ``logits``: SSD [B, A, K + 1] per anchor; Faster R-CNN [R, K + 1] per sampled RoI
  (per proposal without targets). Feature taps: SSD ``conv4_3`` (VGG conv4_3 after its ReLU,
  before the L2 norm; the stride-8 map of tiny_ssd), Faster R-CNN ``backbone.0..N`` (FPN levels in
  order) and ``roi`` (box-head features [R, D]).
- ``feature_taps()`` / ``request_taps(names)``: the named backbone maps below the last one
  (``selftrain.types.Tap``: channels, stride) that a loss term asks for at attach time; only the
  requested ones join ``features``. ``request_rois(pooled=...)`` (Faster R-CNN): every later
  ``forward_train`` carries a ``RoIRecord`` in ``StepOutputs.rois``. See ``adapters/taps.py``.

Negatives (WST, Kim et al. ICCV 2019, arXiv:1909.00597, Sec. 3.2 and Table 4):
- SSD, computed here from torchvision's pieces (``SSD.compute_loss`` hard-codes hard mining):
  "hard" = 3:1 hard negative mining (equal to torchvision's loss), "weak" = of those negatives the
  third with the lowest confidence loss (``selftrain.detection.weak_negative_mask``), "none" = only
  positives. Both losses are divided by the number of positives in every mode.
- Faster R-CNN samples instead of mining: the RPN draws 256 anchors per image (up to half
  positive), the RoI head 512 proposals (up to 25 % positive), negatives at random. "hard" keeps
  torchvision's losses exactly. "weak": of the negatives each sampler drew in an image, only the
  floor(n / 3) with the lowest loss (objectness BCE for the RPN, cross-entropy for the RoI head)
  enter the classification loss; the high-loss ones are the likeliest missed objects. "none":
  positives only. Denominators stay torchvision's (all sampled examples), so a mode only removes
  terms and "weak" <= "hard" on the same sample.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.models.detection.faster_rcnn import FasterRCNN
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import box_iou, clip_boxes_to_image

from selftrain.detection import NEGATIVE_MODES, check_srrs_candidates, class_candidates, negative_mask
from selftrain.errors import ConfigError
from selftrain.types import DetPrediction, RoIRecord, StepOutputs, Tap, TapError

from .registry import ADAPTERS
from .segmentation import load_weights
from .taps import (TapTable, refined_boxes, sample_labelled, sample_unlabelled, unlabelled_option,
                   unnormalised)

Targets = list[dict[str, Tensor]]


class DetectionAdapter:
    """What SSD and Faster R-CNN adapters share: input/target checks, raw candidates, state."""

    task = "detection"
    dense_logits = False  # True when ``forward_train``'s logits hold one row per default box (SSD)

    def __init__(self, *, model: nn.Module, num_classes: int, raw_score_thresh: float = 0.01,
                 raw_candidates: int = 1000, srrs_candidates: str = "per_class", taps: TapTable | None = None) -> None:
        self.model = model
        self.num_classes = num_classes
        self.raw_score_thresh = raw_score_thresh
        self.raw_candidates = raw_candidates
        self.srrs_candidates = check_srrs_candidates(srrs_candidates)
        self.tap_table = taps if taps is not None else TapTable(model, (), model=type(self).__name__)

    def feature_taps(self) -> dict[str, Tap]:
        """The backbone maps a loss term can request, shallowest first (``adapters/taps.py``)."""
        return self.tap_table.declared()

    def request_taps(self, names) -> dict[str, Tap]:
        """Make ``forward_train`` return these taps in ``features`` from now on; raises TapError for an
        unknown tap (listing the valid ones) or a frozen one (naming the frozen layers)."""
        return self.tap_table.request(names)

    def request_rois(self, *, pooled: bool = False) -> None:
        """Single-stage detectors have no RoIs: always a TapError."""
        raise TapError(f"{self.tap_table.model} is a single-stage detector without RoIs; "
                       "use a Faster R-CNN adapter (tiny_frcnn, fasterrcnn_vgg16, fasterrcnn_resnet50_fpn)")

    @property
    def per_class(self) -> bool:
        """Whether predictions carry the per-class pre-NMS lists (``srrs_candidates: per_class``)."""
        return self.srrs_candidates == "per_class"

    def to(self, device: str | torch.device) -> DetectionAdapter:
        self.model.to(device)
        return self

    def head_parameters(self) -> list[nn.Parameter] | None:
        """None: detectors train with one learning rate (``optim.head_lr_mult`` must stay 1)."""
        return None

    def feature_channels(self) -> dict[str, int]:
        """Named backbone taps of ``forward_train``'s features and their channels."""
        return {}

    def parameters(self):
        return self.model.parameters()

    def state_dict(self) -> dict[str, Any]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)

    def _targets(self, targets: Targets, images: list[Tensor]) -> Targets:
        """Copies of ``targets`` as float32 [M, 4] / int64 [M] on the images' device, checked."""
        if len(targets) != len(images):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        out = []
        for i, t in enumerate(targets):
            boxes = torch.as_tensor(t["boxes"], dtype=torch.float32, device=images[i].device).reshape(-1, 4)
            labels = torch.as_tensor(t["labels"], dtype=torch.int64, device=images[i].device).reshape(-1)
            if len(labels) != len(boxes):
                raise ValueError(f"target {i}: {len(boxes)} boxes but {len(labels)} labels")
            if len(labels) and (labels.min() < 1 or labels.max() > self.num_classes):
                raise ValueError(f"target {i}: labels must be in 1..{self.num_classes} (0 is background), "
                                 f"got {labels.unique().tolist()}")
            bad = (boxes[:, 2:] <= boxes[:, :2]).any(1)
            if bad.any():
                raise ValueError(f"target {i}: box {boxes[bad][0].tolist()} has no area (xyxy, x2 > x1, y2 > y1)")
            out.append({"boxes": boxes, "labels": labels})
        return out

    def _predictions(self, dets: Targets, candidates: list[Tensor], probs, sizes: list[tuple[int, int]],
                     originals: list[tuple[int, int]], per_class: Targets | None = None) -> list[DetPrediction]:
        """Post-NMS detections plus, per image, the raw candidates (clipped to the network's frame)
        and, with ``per_class`` (the network's frame), the per-class pre-NMS lists."""
        out = []
        for i, det in enumerate(dets):
            raw_boxes, raw_probs = self._raw(clip_boxes_to_image(candidates[i], sizes[i]), probs[i], sizes[i],
                                             originals[i])
            lists = None
            if per_class is not None:  # the same resize as the detections', so each finds itself at IoU 1
                lists = {**per_class[i], "boxes": resize_boxes(per_class[i]["boxes"], sizes[i], originals[i])}
            out.append(DetPrediction(boxes=det["boxes"], scores=det["scores"], labels=det["labels"],
                                     raw_boxes=raw_boxes, raw_probs=raw_probs, class_candidates=lists))
        return out

    def _raw(self, boxes: Tensor, probs: Tensor, size: tuple[int, int], original: tuple[int, int]
             ) -> tuple[Tensor, Tensor]:
        """The pre-NMS candidates kept for SRRS, highest foreground probability first, in input pixels.

        Shape: boxes [A, 4] clipped in the network's frame, probs [A, K + 1] -> [N, 4], [N, K + 1].
        """
        fg = probs[:, 1:].max(1).values
        keep = torch.where(fg >= self.raw_score_thresh)[0]
        keep = keep[fg[keep].argsort(descending=True)][: self.raw_candidates]
        return resize_boxes(boxes[keep], size, original), probs[keep]


def grids(features: list[Tensor]) -> list[Tensor]:
    """Float32 stand-ins of the feature maps for the anchor generators, which read only their grid
    size, dtype and device: anchors and default boxes stay float32 under mixed precision, and with
    them box coding, matching, NMS and the losses (mmdetection's ``force_fp32`` for the same reason:
    half-precision box coordinates are off by up to 4 px at 1,000 px in bfloat16)."""
    return [f.new_empty(tuple(f.shape[-2:]), dtype=torch.float32) for f in features]


def image_list(images: Tensor | list[Tensor]) -> list[Tensor]:
    """A [B, 3, H, W] tensor, one [3, H, W] tensor or a list of them -> list of [3, H, W]."""
    if isinstance(images, Tensor):
        return list(images.unbind(0)) if images.dim() == 4 else [images]
    return list(images)


@contextmanager
def capture(modules: dict[str, nn.Module]) -> Iterator[dict[str, Tensor]]:
    """Record the outputs of named submodules during the forward passes inside the block."""
    seen: dict[str, Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out))
               for name, m in modules.items()]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def srrs_option(value: str) -> str:
    """A builder's ``srrs_candidates``, checked as the recipe value it is (a one-line error in the CLI)."""
    try:
        return check_srrs_candidates(value)
    except ValueError as exc:
        raise ConfigError(f"model.options.{exc}") from None


def check_mode(negatives: str) -> None:
    if negatives not in NEGATIVE_MODES:
        raise ValueError(f"unknown negatives {negatives!r}; valid: {', '.join(NEGATIVE_MODES)}")


# --------------------------------------------------------------------------- SSD


class SSDAdapter(DetectionAdapter):
    """A torchvision :class:`SSD` (VGG-16 SSD300 or tiny_ssd) whose loss is computed here."""

    dense_logits = True

    def feature_channels(self) -> dict[str, int]:
        """Named feature taps of ``forward_train`` and their channels: ``conv4_3`` (after relu4_3)."""
        convs = [m for m in self.model.backbone.features.modules() if isinstance(m, nn.Conv2d)]
        return {"conv4_3": convs[-1].out_channels}

    def trunk_end(self) -> nn.Module:
        """The last module every detection map depends on, where a gradient reversal layer splits the
        network into feature extractor and classifier (BSR): relu4_3 in SSD300, the stride-4 stage
        of tiny_ssd with ``first_stride: 4``."""
        backbone = self.model.backbone
        return backbone.trunk_end if hasattr(backbone, "trunk_end") else backbone.features[-1]

    @torch.no_grad()
    def predict(self, images: Tensor | list[Tensor]) -> list[DetPrediction]:
        self.model.eval()
        images = image_list(images)
        if not images:
            return []
        originals = [tuple(im.shape[-2:]) for im in images]
        batch, _, head, anchors = self._forward(images, None)
        m = self.model
        dets = m.postprocess_detections(head, anchors, batch.image_sizes)
        dets = m.transform.postprocess(dets, batch.image_sizes, originals)
        probs = head["cls_logits"].float().softmax(-1)
        candidates = [m.box_coder.decode_single(head["bbox_regression"][i], anchors[i]) for i in range(len(dets))]
        per_class = None
        if self.per_class:  # SSD.postprocess_detections up to its batched_nms
            per_class = [class_candidates(clip_boxes_to_image(b, s), p, m.score_thresh, m.topk_candidates)
                         for b, p, s in zip(candidates, probs, batch.image_sizes)]
        return self._predictions(dets, candidates, probs, batch.image_sizes, originals, per_class)

    def forward_train(self, images: Tensor | list[Tensor], targets: Targets | None = None, *,
                      negatives: str = "hard", box_loss: bool = True) -> StepOutputs:
        check_mode(negatives)
        self.model.train()
        images = image_list(images)
        targets = None if targets is None else self._targets(targets, images)
        with capture({"conv4_3": self.model.backbone.features[-1], **self.tap_table.modules()}) as taps:
            _, resized, head, anchors = self._forward(images, targets)
        losses = {}
        if resized is not None:
            matched = [self._match(a, t) for a, t in zip(anchors, resized)]
            losses = ssd_losses(head, anchors, matched, resized, self.model.box_coder,
                                negatives=negatives, box_loss=box_loss)
        return StepOutputs(losses=losses, logits=head["cls_logits"], features=dict(taps))

    def _forward(self, images: list[Tensor], targets: Targets | None):
        """Transform, backbone, head and anchors: torchvision's ``SSD.forward`` up to the loss."""
        m = self.model
        batch, targets = m.transform(images, targets)
        features = list(m.backbone(batch.tensors).values())
        head = {k: v.float() for k, v in m.head(features).items()}
        return batch, targets, head, m.anchor_generator(batch, grids(features))

    def _match(self, anchors: Tensor, target: dict[str, Tensor]) -> Tensor:
        """Matched ground-truth index per anchor, -1 for background (torchvision's SSDMatcher)."""
        if target["boxes"].numel() == 0:
            return torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device)
        return self.model.proposal_matcher(box_iou(target["boxes"], anchors))


def ssd_losses(head: dict[str, Tensor], anchors: list[Tensor], matched: list[Tensor], targets: Targets,
               box_coder: Any, *, negatives: str = "hard", box_loss: bool = True,
               neg_pos_ratio: int = 3) -> dict[str, Tensor]:
    """SSD MultiBox loss (Liu et al. 2016) with a choice of negatives (Kim et al. 2019, Eqs. 1-2).

    With ``negatives="hard"`` this is torchvision's ``SSD.compute_loss``: cross-entropy over the
    positives and the mined negatives plus smooth-L1 on the positives' encoded boxes, both divided
    by the number of positives in the batch (at least 1).

    Shape:
        head: {"cls_logits": [B, A, K + 1], "bbox_regression": [B, A, 4]}; anchors, matched: B x [A]
        (matched ground-truth index or negative); targets: B x {"boxes": [M, 4], "labels": [M]}.
    """
    cls_logits, regression = head["cls_logits"], head["bbox_regression"]
    cls_targets, box_terms = [], []
    for reg, anc, idx, target in zip(regression, anchors, matched, targets):
        fg = torch.where(idx >= 0)[0]
        encoded = box_coder.encode_single(target["boxes"][idx[fg]], anc[fg])
        box_terms.append(F.smooth_l1_loss(reg[fg], encoded, reduction="sum"))
        labels = torch.zeros(anc.shape[0], dtype=torch.int64, device=anc.device)
        labels[fg] = target["labels"][idx[fg]]
        cls_targets.append(labels)
    labels = torch.stack(cls_targets)
    conf = F.cross_entropy(cls_logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    positive = labels > 0
    negative = negative_mask(negatives, conf.detach(), positive, neg_pos_ratio)
    num_pos = max(1, int(positive.sum()))
    box = torch.stack(box_terms).sum() if box_loss else regression.sum() * 0.0
    return {"cls": (conf[positive].sum() + conf[negative].sum()) / num_pos, "box": box / num_pos}


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class TinySSDBackbone(nn.Module):
    """Conv-BN-ReLU stages to stride 8 (``features``), then stride-2 stages; four output maps.

    ``first_stride=8``: maps at strides 8, 16, 32, 64 (16, 8, 4 and 2 cells at 128 px), ``width``
    channels each. ``first_stride=4``: maps at strides 4, 8, 16, 32, the first taken inside
    ``features`` (``width // 2`` channels). Output: an ordered dict of the four maps.
    """

    def __init__(self, width: int = 32, first_stride: int = 4) -> None:
        super().__init__()
        if first_stride not in (4, 8):
            raise ValueError(f"tiny_ssd first_stride must be 4 or 8, got {first_stride}")
        half = width // 2
        self.features = nn.Sequential(_conv(3, half // 2, 2), _conv(half // 2, half, 2), _conv(half, half, 1),
                                      _conv(half, width, 2), _conv(width, width, 1))
        self.extra = nn.ModuleList([_conv(width, width, 2) for _ in range(3 if first_stride == 8 else 2)])
        self.first_stride = first_stride
        self.out_channels = [width] * 4 if first_stride == 8 else [half] + [width] * 3

    @property
    def trunk_end(self) -> nn.Module:
        """The stage whose output feeds every map (the first map's)."""
        return self.features[2] if self.first_stride == 4 else self.features[-1]

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        maps = []
        for i, stage in enumerate(self.features):
            x = stage(x)
            if i == 2 and self.first_stride == 4:
                maps.append(x)
        maps.append(x)
        for block in self.extra:
            x = block(x)
            maps.append(x)
        return OrderedDict((str(i), v) for i, v in enumerate(maps))


@ADAPTERS.register("tiny_ssd", task="detection")
def tiny_ssd(*, num_classes: int, size: int = 128, width: int = 32, first_stride: int = 4,
             score_thresh: float = 0.01, nms_thresh: float = 0.45, detections_per_img: int = 100,
             raw_score_thresh: float = 0.01, raw_candidates: int = 1000,
             srrs_candidates: str = "per_class") -> SSDAdapter:
    """A small single-shot detector (torchvision SSD, tiny conv backbone) for tests and the CPU demo.

    Default boxes span 8 % to 85 % of the image over four maps (10 to 109 px at 128 px), with
    aspect ratios 2 on the first and last map and 2, 3 between, as SSD300. ``first_stride``: the
    stride of the first map, 4 (maps at strides 4-32, the default) or 8 (strides 8-64). With 4 the
    default boxes of a map are 2.4-3.2 times its stride, as in SSD300 (30 px boxes every 8 px on
    conv4_3): neighbouring boxes overlap, so every object is matched, and later detected, by
    several of them (at least 3 at IoU 0.5 for 10-20 px objects). With 8 that ratio is 1.2-1.6 and
    a small object often has no default box at IoU 0.5, only its best one; on the synthetic
    benchmark such a detector scores half the target mAP. ``size`` must be a multiple of
    the last map's stride (64, or 32). ``num_classes`` = K object classes, background added.
    ``srrs_candidates``: ``per_class`` or ``any_class`` (module docstring).
    """
    srrs_option(srrs_candidates)
    last = first_stride * 8
    if size % last:
        raise ValueError(f"tiny_ssd size must be a multiple of {last} (stride of its last map), got {size}")
    anchors = DefaultBoxGenerator([[2], [2, 3], [2, 3], [2]], scales=[0.08, 0.2, 0.38, 0.6, 0.85])
    model = SSD(TinySSDBackbone(width, first_stride), anchors, (size, size), num_classes + 1,
                score_thresh=score_thresh, nms_thresh=nms_thresh, detections_per_img=detections_per_img)
    return SSDAdapter(model=model, num_classes=num_classes, raw_score_thresh=raw_score_thresh,
                      raw_candidates=raw_candidates, srrs_candidates=srrs_candidates,
                      taps=ssd_taps(model, width, "tiny_ssd"))


def ssd_taps(model: SSD, channels: int, name: str, unfreeze: str = "") -> TapTable:
    """SSD's one tap: ``conv4_3`` (after its ReLU; the stride-8 map), the end of ``backbone.features``."""
    path = f"backbone.features.{len(model.backbone.features) - 1}"
    return TapTable(model, [(Tap("conv4_3", channels, 8), path)], model=name, unfreeze=unfreeze)


def vgg16_features() -> nn.Module:
    """torchvision's VGG-16 without its classifier (102 M parameters SSD discards), same init.

    A module with ``features`` only, so torchvision VGG-16 state dicts load by their own keys.
    """
    from torchvision.models.vgg import cfgs, make_layers

    vgg = nn.Module()
    vgg.features = make_layers(cfgs["D"])
    for conv in vgg.features.modules():
        if isinstance(conv, nn.Conv2d):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
    return vgg


# Pixel normalisation of the VGG backbone: "caffe" fits torchvision's SSD backbone weights
# (VGG16_Weights.IMAGENET1K_FEATURES, inputs in 0..255 minus the mean); "imagenet" fits the usual
# classification checkpoints (vgg16-397923af.pth) that expect ImageNet mean/std on [0, 1] inputs.
_VGG_NORMS = {"caffe": ([0.48235, 0.45882, 0.40784], [1.0 / 255.0] * 3),
              "imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])}


@ADAPTERS.register("ssd300_vgg16", task="detection")
def ssd300_vgg16(*, num_classes: int, backbone_weights: str | None = None, pixel_norm: str = "caffe",
                 trainable_backbone_layers: int | None = None, score_thresh: float = 0.01,
                 nms_thresh: float = 0.45, detections_per_img: int = 200, raw_score_thresh: float = 0.01,
                 raw_candidates: int = 1000, srrs_candidates: str = "per_class") -> SSDAdapter:
    """SSD300 with a VGG-16 backbone (Liu et al. 2016), the detector of WST/BSR, as torchvision builds it.

    Inputs are resized to 300 x 300 (the VGG extra layers need at least 268 px; the default boxes are
    SSD300's). ``backbone_weights``: a local torchvision VGG-16 state dict (``features.*`` keys;
    ``classifier.*`` is ignored); with it only the last ``trainable_backbone_layers`` (default 4 of
    5: conv1 frozen) VGG stages train, as in torchvision. ``pixel_norm`` must fit those weights.
    ``num_classes`` = K object classes, background added; ``srrs_candidates`` as in the module docstring.
    """
    from torchvision.models.detection.ssd import _vgg_extractor

    srrs_option(srrs_candidates)
    if pixel_norm not in _VGG_NORMS:
        raise ValueError(f"unknown pixel_norm {pixel_norm!r}; valid: {', '.join(_VGG_NORMS)}")
    vgg = vgg16_features()
    if backbone_weights:
        load_weights(vgg, backbone_weights, "VGG-16 backbone")
    trainable = trainable_backbone_layers if trainable_backbone_layers is not None else (4 if backbone_weights else 5)
    anchors = DefaultBoxGenerator([[2], [2, 3], [2, 3], [2, 3], [2], [2]],
                                  scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05], steps=[8, 16, 32, 64, 100, 300])
    mean, std = _VGG_NORMS[pixel_norm]
    model = SSD(_vgg_extractor(vgg, False, trainable), anchors, (300, 300), num_classes + 1, image_mean=mean,
                image_std=std, score_thresh=score_thresh, nms_thresh=nms_thresh,
                detections_per_img=detections_per_img)
    taps = ssd_taps(model, 512, "ssd300_vgg16", "set model.options.trainable_backbone_layers: 5 to train them")
    return SSDAdapter(model=model, num_classes=num_classes, raw_score_thresh=raw_score_thresh,
                      raw_candidates=raw_candidates, srrs_candidates=srrs_candidates, taps=taps)


# --------------------------------------------------------------------------- Faster R-CNN


class FasterRCNNAdapter(DetectionAdapter):
    """A torchvision :class:`FasterRCNN` run step by step so that background sampling can be weakened.

    ``unlabelled_rois`` (images without targets in train mode): None pools every post-NMS proposal;
    {n, mode: random | top} pools n of them per image (``adapters/taps.py:sample_unlabelled``). A
    loss term that calls ``request_rois`` gets a :class:`RoIRecord` on every ``forward_train``.
    """

    def __init__(self, *, unlabelled_rois: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.unlabelled_rois = unlabelled_option(unlabelled_rois)
        self.rois_pooled: bool | None = None  # None: no record; else whether it holds the pooled features

    def request_rois(self, *, pooled: bool = False) -> None:
        """Fill ``StepOutputs.rois`` from now on, with the 7x7 pooled features when ``pooled``."""
        self.rois_pooled = bool(pooled or self.rois_pooled)

    def feature_channels(self) -> dict[str, int]:
        """Feature maps of ``forward_train`` (one per anchor level, ``backbone.0`` finest) and their channels."""
        levels = len(self.model.rpn.anchor_generator.sizes)
        return {f"backbone.{i}": self.model.backbone.out_channels for i in range(levels)}

    @torch.no_grad()
    def predict(self, images: Tensor | list[Tensor]) -> list[DetPrediction]:
        self.model.eval()
        images = image_list(images)
        if not images:
            return []
        m, rh = self.model, self.model.roi_heads
        originals = [tuple(im.shape[-2:]) for im in images]
        batch, _ = m.transform(images)
        features = m.backbone(batch.tensors)
        proposals, _, _ = self._rpn(batch, features, None, "hard", True)
        logits, regression, _, _ = self._box_predictor(features, proposals, batch.image_sizes)
        boxes, scores, labels = rh.postprocess_detections(logits, regression, proposals, batch.image_sizes)
        dets = [{"boxes": b, "scores": s, "labels": c} for b, s, c in zip(boxes, scores, labels)]
        dets = m.transform.postprocess(dets, batch.image_sizes, originals)
        per_image = [len(p) for p in proposals]
        class_boxes = rh.box_coder.decode(regression, proposals).split(per_image)
        probs = logits.float().softmax(-1).split(per_image)
        best = [p[:, 1:].argmax(1) + 1 for p in probs]  # one box per proposal: its argmax foreground class's
        candidates = [b[torch.arange(len(c), device=c.device), c] for b, c in zip(class_boxes, best)]
        per_class = None
        if self.per_class:  # RoIHeads.postprocess_detections up to its batched_nms
            per_class = [class_candidates(clip_boxes_to_image(b, s), p, rh.score_thresh, min_size=1e-2)
                         for b, p, s in zip(class_boxes, probs, batch.image_sizes)]
        return self._predictions(dets, candidates, probs, batch.image_sizes, originals, per_class)

    def forward_train(self, images: Tensor | list[Tensor], targets: Targets | None = None, *,
                      negatives: str = "hard", box_loss: bool = True) -> StepOutputs:
        check_mode(negatives)
        self.model.train()
        images = image_list(images)
        targets = None if targets is None else self._targets(targets, images)
        m = self.model
        batch, targets = m.transform(images, targets)
        with capture(self.tap_table.modules()) as tapped:
            features = m.backbone(batch.tensors)
        proposals, scores, losses = self._rpn(batch, features, targets, negatives, box_loss)
        labels = None
        if targets is None:  # no boxes exist here: the sample depends on the proposals only
            proposals, scores = sample_unlabelled(proposals, scores, self.unlabelled_rois)
        else:
            proposals, scores, labels, regression_targets = sample_labelled(m.roi_heads, proposals, scores, targets)
        logits, regression, roi, pooled = self._box_predictor(features, proposals, batch.image_sizes)
        if targets is not None:
            _, box = fastrcnn_loss(logits, regression, labels, regression_targets)
            ce = F.cross_entropy(logits, torch.cat(labels), reduction="none")
            losses["roi_cls"] = sampled_loss(ce, labels, negatives)
            losses["roi_box"] = box if box_loss else regression.sum() * 0.0
        taps = {f"backbone.{i}": f for i, f in enumerate(features.values())}
        rois = None
        if self.rois_pooled is not None:
            rois = self._record(batch, proposals, scores, labels, logits, regression, pooled)
        return StepOutputs(losses=losses, logits=logits, features={**taps, **tapped, "roi": roi}, rois=rois)

    def _record(self, batch, proposals: list[Tensor], scores: list[Tensor], labels: list[Tensor] | None,
                logits: Tensor, regression: Tensor, pooled: Tensor) -> RoIRecord:
        """The :class:`RoIRecord` of one ``forward_train`` (pooled features only if requested)."""
        m = self.model
        refined = refined_boxes(m.roi_heads.box_coder, regression, logits, proposals, batch.image_sizes)
        return RoIRecord(boxes=proposals, counts=[len(p) for p in proposals], labels=labels, objectness=scores,
                         logits=logits, regression=regression, refined=refined,
                         pooled=pooled if self.rois_pooled else None, image_sizes=list(batch.image_sizes),
                         input=unnormalised(batch, m.transform))

    def _rpn(self, batch, features: dict[str, Tensor], targets: Targets | None, negatives: str,
             box_loss: bool) -> tuple[list[Tensor], list[Tensor], dict[str, Tensor]]:
        """torchvision's ``RegionProposalNetwork.forward`` with the objectness loss of ``negatives``;
        also returns each proposal's objectness probability (highest first per image)."""
        rpn = self.model.rpn
        maps = list(features.values())
        objectness, deltas = ([x.float() for x in out] for out in rpn.head(maps))
        anchors = rpn.anchor_generator(batch, grids(maps))
        per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        decoded = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        proposals, scores = rpn.filter_proposals(decoded, objectness, batch.image_sizes, per_level)
        if targets is None:
            return proposals, scores, {}
        labels, matched = rpn.assign_targets_to_anchors(anchors, targets)
        regression_targets = torch.cat(rpn.box_coder.encode(matched, anchors))
        pos, neg = rpn.fg_bg_sampler(labels)
        # -1 marks anchors outside the sample, so only sampled anchors reach sampled_loss.
        sampled = [torch.where(p.bool(), 1, torch.where(n.bool(), 0, -1)) for p, n in zip(pos, neg)]
        bce = F.binary_cross_entropy_with_logits(objectness.flatten(), torch.cat(labels), reduction="none")
        positive = torch.cat(sampled) > 0
        count = int((torch.cat(sampled) >= 0).sum())
        box = F.smooth_l1_loss(deltas[positive], regression_targets[positive], beta=1 / 9, reduction="sum")
        return proposals, scores, {"rpn_cls": sampled_loss(bce, sampled, negatives),
                                   "rpn_box": box / count if box_loss else deltas.sum() * 0.0}

    def _box_predictor(self, features: dict[str, Tensor], proposals: list[Tensor], sizes):
        """The RoI head: class logits [R, K + 1] and box regression [R, 4 (K + 1)] (float32), the
        box-head features [R, D] and the RoIAlign output [R, C, 7, 7]."""
        rh = self.model.roi_heads
        pooled = rh.box_roi_pool({k: v.float() for k, v in features.items()}, proposals, sizes)
        roi = rh.box_head(pooled)
        logits, regression = (x.float() for x in rh.box_predictor(roi))
        return logits, regression, roi, pooled


def sampled_loss(loss: Tensor, labels: list[Tensor], negatives: str) -> Tensor:
    """Classification loss over a sampled set with weakened negatives (see the module docstring).

    Per image, labels > 0 are sampled positives, 0 sampled negatives, < 0 not sampled. "hard"
    keeps every sampled negative, "weak" the floor(n / 3) with the lowest loss, "none" none. The
    sum is divided by the number of sampled examples in every mode (torchvision's mean for "hard").
    This is not ``weak_negative_mask``: the sampler has already chosen the pool, so no 3:1 mining.

    Shape: loss [sum of L_i] per-example losses; labels: one [L_i] per image -> scalar.
    """
    kept = []
    for part, lab in zip(loss.detach().split([len(x) for x in labels]), labels):
        negative = lab == 0
        if negatives == "weak":
            idx = torch.where(negative)[0]
            easiest = idx[part[idx].argsort(stable=True)[: len(idx) // 3]]
            negative = torch.zeros_like(negative).index_fill_(0, easiest, True)
        elif negatives == "none":
            negative = torch.zeros_like(negative)
        kept.append((lab > 0) | negative)
    labels = torch.cat(labels)
    return loss[torch.cat(kept)].sum() / max(1, int((labels >= 0).sum()))


def _faster_rcnn(body: str, *, num_classes: int, backbone_weights: str | None,
                 trainable_backbone_layers: int | None, raw_score_thresh: float, raw_candidates: int,
                 srrs_candidates: str = "per_class", unlabelled_rois: dict[str, Any] | None = None,
                 name: str = "", **options: Any) -> FasterRCNNAdapter:
    """torchvision's Faster R-CNN builders, but with backbone weights from a local file.

    As in torchvision, a pretrained backbone gets frozen batch norm and trains only its last
    ``trainable_backbone_layers`` stages (default 3); a random one uses batch norm and trains all.
    """
    from torchvision.models import mobilenet_v3_large, resnet50
    from torchvision.models.detection.backbone_utils import _mobilenet_extractor, _resnet_fpn_extractor
    from torchvision.ops.misc import FrozenBatchNorm2d

    srrs_option(srrs_candidates)
    unlabelled_rois = unlabelled_option(unlabelled_rois)
    norm = FrozenBatchNorm2d if backbone_weights else nn.BatchNorm2d
    most = 5 if body == "resnet50" else 6
    trainable = trainable_backbone_layers
    if trainable is None:
        trainable = 3 if backbone_weights else most
    if not 0 <= trainable <= most:
        raise ValueError(f"trainable_backbone_layers must be in 0..{most} for {body}, got {trainable}")
    if body == "resnet50":
        net = resnet50(weights=None, norm_layer=norm)
    else:
        net = mobilenet_v3_large(weights=None, dilated=True, norm_layer=norm)
    if backbone_weights:
        load_weights(net, backbone_weights, f"{body} backbone")
    if body == "resnet50":
        model = FasterRCNN(_resnet_fpn_extractor(net, trainable), num_classes + 1, **options)
    else:
        anchors = AnchorGenerator(((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3)
        model = FasterRCNN(_mobilenet_extractor(net, True, trainable), num_classes + 1,
                           rpn_anchor_generator=anchors, rpn_score_thresh=0.05, **options)
    layers = [(Tap(f"body.layer{i}", 64 * 2 ** (i + 1), 2 ** (i + 1)), f"backbone.body.layer{i}")
              for i in range(1, 5)] if body == "resnet50" else []  # C2..C5; MobileNet: none (no paper uses it)
    taps = TapTable(model, layers, model=name, unfreeze=f"set model.options.trainable_backbone_layers: {most} "
                                                         "to train them")
    return FasterRCNNAdapter(model=model, num_classes=num_classes, raw_score_thresh=raw_score_thresh,
                             raw_candidates=raw_candidates, srrs_candidates=srrs_candidates, taps=taps,
                             unlabelled_rois=unlabelled_rois)


def _register_faster_rcnn(name: str, body: str, min_size: int, max_size: int) -> None:
    def build(*, num_classes: int, backbone_weights: str | None = None, min_size: int = min_size,
              max_size: int = max_size, trainable_backbone_layers: int | None = None,
              score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 100,
              raw_score_thresh: float = 0.01, raw_candidates: int = 1000,
              srrs_candidates: str = "per_class", unlabelled_rois: dict[str, Any] | None = None) -> FasterRCNNAdapter:
        return _faster_rcnn(body, num_classes=num_classes, backbone_weights=backbone_weights,
                            trainable_backbone_layers=trainable_backbone_layers, min_size=min_size,
                            max_size=max_size, box_score_thresh=score_thresh, box_nms_thresh=nms_thresh,
                            box_detections_per_img=detections_per_img, raw_score_thresh=raw_score_thresh,
                            raw_candidates=raw_candidates, srrs_candidates=srrs_candidates,
                            unlabelled_rois=unlabelled_rois, name=name)

    build.__doc__ = (f"Faster R-CNN with a {body} FPN backbone (torchvision); ``num_classes`` = K object "
                     "classes, background added; ``backbone_weights`` a local ImageNet state dict.")
    ADAPTERS.register(name, task="detection")(build)


_register_faster_rcnn("fasterrcnn_resnet50_fpn", "resnet50", 800, 1333)
_register_faster_rcnn("fasterrcnn_mobilenet", "mobilenet_v3_large", 800, 1333)


class VGG16Conv5(nn.Module):
    """VGG-16 from conv1_1 to conv5_3 and its ReLU (stride 16, 512 channels), one map named "0"."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(*vgg16_features().features[:30])  # drops pool5
        self.out_channels = 512

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return OrderedDict([("0", self.features(x))])


class VGG16BoxHead(nn.Module):
    """VGG-16's fc6 and fc7 on 7x7 RoI features (keys ``classifier.0``/``classifier.3`` as in VGG)."""

    def __init__(self, width: int = 4096) -> None:
        super().__init__()
        self.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, width), nn.ReLU(inplace=True), nn.Dropout(),
                                        nn.Linear(width, width), nn.ReLU(inplace=True), nn.Dropout())

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(x.flatten(1))


@ADAPTERS.register("fasterrcnn_vgg16", task="detection")
def fasterrcnn_vgg16(*, num_classes: int, backbone_weights: str | None = None, width: int = 4096,
                     anchor_sizes: list[int] | None = None, trainable_backbone_layers: int | None = None,
                     min_size: int = 600, max_size: int = 1000, score_thresh: float = 0.05, nms_thresh: float = 0.3,
                     detections_per_img: int = 100, raw_score_thresh: float = 0.01, raw_candidates: int = 1000,
                     srrs_candidates: str = "per_class",
                     unlabelled_rois: dict[str, Any] | None = None) -> FasterRCNNAdapter:
    """Faster R-CNN on VGG-16, the detector of DA Faster R-CNN, SWDA, SCDA and HTCN (py-faster-rcnn's).

    conv5_3 features (stride 16, no FPN), anchors 128/256/512 px at ratios 0.5/1/2 (scales 8, 16,
    32), 7x7 RoIAlign, VGG's fc6/fc7 as the box head (``width`` 4096; smaller only for tests);
    images resized to a shorter side of 600 (at most 1000), test NMS 0.3. ``backbone_weights``: a
    local torchvision ``vgg16`` state dict; ``features.*`` and ``classifier.0``/``classifier.3``
    (fc6/fc7, needs ``width=4096``) load. With weights, conv1 and conv2 stay frozen as in
    py-faster-rcnn (``trainable_backbone_layers`` 3 of 5 VGG stages); without, all train.
    Taps (``feature_taps``): pool2, relu3_2, relu3_3, pool3, relu4_2, pool4, relu5_3 (= backbone.0);
    ``unlabelled_rois`` as in :class:`FasterRCNNAdapter`.
    """
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    srrs_option(srrs_candidates)
    unlabelled_rois = unlabelled_option(unlabelled_rois)
    trainable = trainable_backbone_layers if trainable_backbone_layers is not None else (3 if backbone_weights else 5)
    if not 0 <= trainable <= 5:
        raise ValueError(f"trainable_backbone_layers must be in 0..5 for VGG-16, got {trainable}")
    backbone, head = VGG16Conv5(), VGG16BoxHead(width)
    if backbone_weights:
        vgg = nn.Module()
        vgg.features, vgg.classifier = backbone.features, head.classifier
        load_weights(vgg, backbone_weights, "VGG-16")
    first_trainable = [0, 5, 10, 17, 24, 30][5 - trainable]  # VGG-16 stage boundaries in ``features``
    for p in backbone.features[:first_trainable].parameters():
        p.requires_grad_(False)
    sizes = tuple(anchor_sizes or (128, 256, 512))
    model = FasterRCNN(backbone, None, min_size=min_size, max_size=max_size,
                       rpn_anchor_generator=AnchorGenerator((sizes,), ((0.5, 1.0, 2.0),)),
                       box_roi_pool=MultiScaleRoIAlign(["0"], output_size=7, sampling_ratio=2), box_head=head,
                       box_predictor=FastRCNNPredictor(width, num_classes + 1), box_score_thresh=score_thresh,
                       box_nms_thresh=nms_thresh, box_detections_per_img=detections_per_img)
    taps = TapTable(model, [(Tap(n, c, s), f"backbone.features.{i}") for n, i, c, s in VGG16_TAPS],
                    model="fasterrcnn_vgg16", unfreeze="set model.options.trainable_backbone_layers: 5 to train them")
    return FasterRCNNAdapter(model=model, num_classes=num_classes, raw_score_thresh=raw_score_thresh,
                             raw_candidates=raw_candidates, srrs_candidates=srrs_candidates, taps=taps,
                             unlabelled_rois=unlabelled_rois)


# (name, index in VGG-16 ``features``, channels, stride): the maps SWDA, HTCN and iFAN align
VGG16_TAPS = (("pool2", 9, 128, 4), ("relu3_2", 13, 256, 4), ("relu3_3", 15, 256, 4), ("pool3", 16, 256, 8),
              ("relu4_2", 20, 512, 8), ("pool4", 23, 512, 16), ("relu5_3", 29, 512, 16))
