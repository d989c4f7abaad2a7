"""Every registered detector honours the detection adapter contract (smp's BaseModelTester style)."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

from selftrain.adapters import ADAPTERS, create_adapter
from selftrain.adapters.detection import sampled_loss
from selftrain.errors import ConfigError, DataError
from selftrain.types import DetPrediction, StepOutputs

K = 3
SSD_LOSSES, RCNN_LOSSES = {"cls", "box"}, {"rpn_cls", "rpn_box", "roi_cls", "roi_box"}
SMALL = {"tiny_ssd": {}, "ssd300_vgg16": {},
         "fasterrcnn_mobilenet": {"min_size": 128, "max_size": 128},
         "fasterrcnn_resnet50_fpn": {"min_size": 128, "max_size": 128},
         "fasterrcnn_vgg16": {"min_size": 128, "max_size": 128, "width": 64}, "tiny_frcnn": {}}
SLOW = {"ssd300_vgg16", "fasterrcnn_resnet50_fpn"}  # a forward pass costs seconds on a CPU
DETECTORS = ADAPTERS.names(task="detection")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_detector_has_a_small_configuration():
    assert sorted(SMALL) == DETECTORS


def is_ssd(name: str) -> bool:
    return "ssd" in name


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    adapter = create_adapter(name, num_classes=K, **SMALL[name])
    if not is_ssd(name):  # fewer proposals and RoIs: the RoI head dominates the CPU time
        adapter.model.rpn._pre_nms_top_n = {"training": 200, "testing": 100}
        adapter.model.rpn._post_nms_top_n = {"training": 64, "testing": 50}
        adapter.model.roi_heads.fg_bg_sampler.batch_size_per_image = 32
    return adapter


@pytest.fixture(params=[pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in DETECTORS])
def name(request):
    return request.param


@pytest.fixture
def adapter(name):
    return build(name)


def batch(seed: int = 0, size: int = 128):
    """Two images: coloured rectangles on noise with their boxes, and one image without boxes."""
    g = torch.Generator().manual_seed(seed)
    images = 0.2 * torch.rand(2, 3, size, size, generator=g)
    boxes = torch.tensor([[8.0, 10.0, 60.0, 70.0], [70.0, 20.0, 120.0, 110.0], [30.0, 80.0, 56.0, 124.0]])
    labels = torch.tensor([1, 3, 2])
    for (x1, y1, x2, y2), c in zip(boxes.int().tolist(), labels.tolist()):
        images[0, c - 1, y1:y2, x1:x2] = 0.9
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    return images, [{"boxes": boxes, "labels": labels}, empty]


def test_predict_returns_valid_detections(adapter):
    images = [torch.rand(3, 96, 128), torch.rand(3, 128, 112)]
    preds = adapter.predict(images)
    assert len(preds) == 2 and not adapter.model.training
    for pred, image in zip(preds, images):
        assert isinstance(pred, DetPrediction)
        h, w = image.shape[-2:]
        m, n = len(pred.boxes), len(pred.raw_boxes)
        assert pred.boxes.shape == (m, 4) and pred.scores.shape == (m,) and pred.labels.shape == (m,)
        assert pred.labels.dtype == torch.int64 and ((pred.labels >= 1) & (pred.labels <= K)).all()
        assert pred.raw_boxes.shape == (n, 4) and pred.raw_probs.shape == (n, K + 1) and 0 < n <= 1000
        for boxes in (pred.boxes, pred.raw_boxes):
            assert (boxes >= -1e-3).all() and (boxes[:, [0, 2]] <= w + 1e-3).all()
            assert (boxes[:, [1, 3]] <= h + 1e-3).all()
        assert torch.allclose(pred.raw_probs.sum(1), torch.ones(n), atol=1e-5)
        assert (pred.raw_probs[:, 1:].max(1).values >= 0.01).all() and not pred.raw_probs.requires_grad
        # The best detection comes from the best candidate: SRRS sees it with IoU 1 and its score.
        assert m > 0
        best = box_iou(pred.boxes[:1], pred.raw_boxes)[0].argmax()
        assert box_iou(pred.boxes[:1], pred.raw_boxes[best : best + 1]).item() > 0.999
        assert pred.raw_probs[best, pred.labels[0]].item() == pytest.approx(pred.scores[0].item(), abs=1e-5)
    assert len(adapter.predict(torch.rand(3, 3, 64, 64))) == 3 and adapter.predict([]) == []


def test_per_class_candidates_hold_every_detection(name, adapter):
    """``srrs_candidates: per_class`` (the default): the per-class pre-NMS lists of the model's own
    post-processing; each final detection is one of its class's candidates, with its score."""
    assert adapter.srrs_candidates == "per_class"
    images = [torch.rand(3, 96, 128), torch.rand(3, 128, 112)]
    threshold = adapter.model.score_thresh if is_ssd(name) else adapter.model.roi_heads.score_thresh
    for pred, image in zip(adapter.predict(images), images):
        c = pred.class_candidates
        n = len(c["boxes"])
        assert c["boxes"].shape == (n, 4) and c["scores"].shape == c["labels"].shape == (n,) and n >= len(pred.boxes)
        assert ((c["labels"] >= 1) & (c["labels"] <= K)).all() and (c["scores"] > threshold).all()
        h, w = image.shape[-2:]
        assert (c["boxes"] >= -1e-3).all() and (c["boxes"][:, [0, 2]] <= w + 1e-3).all()
        for box, score, label in zip(pred.boxes, pred.scores, pred.labels):
            same = (c["boxes"] == box).all(1) & (c["labels"] == label)
            assert same.any() and torch.equal(c["scores"][same][:1], score[None])


def test_any_class_predicts_the_same_without_the_lists(name, adapter):
    """``any_class`` changes nothing but the missing lists: the older single-list reading, bit for bit."""
    other = create_adapter(name, num_classes=K, srrs_candidates="any_class", **SMALL[name])
    other.model = adapter.model
    images = [torch.rand(3, 96, 128), torch.rand(3, 128, 112)]
    torch.manual_seed(0)
    ours = adapter.predict(images)
    torch.manual_seed(0)
    theirs = other.predict(images)
    for a, b in zip(ours, theirs):
        assert b.class_candidates is None and a.class_candidates is not None
        for key in ("boxes", "scores", "labels", "raw_boxes", "raw_probs"):
            assert torch.equal(getattr(a, key), getattr(b, key)), key


def test_unknown_srrs_candidates_names_the_valid_values(name):
    with pytest.raises(ConfigError, match="srrs_candidates must be one of per_class, any_class, got 'all'"):
        create_adapter(name, num_classes=K, srrs_candidates="all", **SMALL[name])


def test_forward_train_gives_named_losses_and_gradients(name, adapter):
    images, targets = batch()
    out = adapter.forward_train(images, targets)
    assert isinstance(out, StepOutputs) and adapter.model.training
    assert set(out.losses) == (SSD_LOSSES if is_ssd(name) else RCNN_LOSSES)
    assert all(torch.isfinite(v) and v.item() > 0 for v in out.losses.values())
    assert out.logits.shape[-1] == K + 1
    taps = {"conv4_3"} if is_ssd(name) else {"backbone.0", "roi"}
    assert taps <= set(out.features) and all(out.features[t].requires_grad for t in taps)
    sum(out.losses.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    # the taps that loss terms may name (``dann``'s tap) exist, with the channels they declare
    channels = adapter.feature_channels()
    assert channels and set(channels) <= set(out.features)
    assert all(out.features[t].dim() == 4 and out.features[t].shape[1] == c for t, c in channels.items())
    # SSD: [B, default boxes, K + 1] (what BSR ranks); Faster R-CNN: [sampled RoIs, K + 1]
    assert adapter.dense_logits == is_ssd(name) and out.logits.dim() == (3 if is_ssd(name) else 2)


def test_images_without_boxes_train(adapter):
    images, targets = batch()
    for chosen in ([targets[1], targets[1]], [targets[1], targets[0]]):
        out = adapter.forward_train(images, chosen, negatives="weak")
        assert all(torch.isfinite(v) for v in out.losses.values())
        sum(out.losses.values()).backward()
    assert adapter.forward_train(images, None).losses == {}


def box_heads(adapter) -> list[torch.nn.Module]:
    model = adapter.model
    if hasattr(model, "roi_heads"):
        return [model.roi_heads.box_predictor.bbox_pred, model.rpn.head.bbox_pred]
    return [model.head.regression_head]


def test_box_loss_off_is_exactly_zero_and_cls_still_trains(name, adapter):
    images, targets = batch()
    out = adapter.forward_train(images, targets, box_loss=False)
    boxes = [k for k in out.losses if k.endswith("box")]
    assert boxes and all(out.losses[k].item() == 0.0 and out.losses[k].requires_grad for k in boxes)
    sum(out.losses.values()).backward()
    assert all(p.grad is not None and not p.grad.any() for m in box_heads(adapter) for p in m.parameters())
    model = adapter.model
    cls_head = model.head.classification_head if is_ssd(name) else model.roi_heads.box_predictor.cls_score
    assert sum(p.grad.abs().sum() for p in cls_head.parameters()) > 0


def test_invalid_targets_and_modes_are_named(adapter):
    images, targets = batch()
    with pytest.raises(ValueError, match="negatives"):
        adapter.forward_train(images, targets, negatives="soft")
    bad = [{"boxes": torch.tensor([[5.0, 5.0, 20.0, 20.0]]), "labels": torch.tensor([0])}, targets[1]]
    with pytest.raises(ValueError, match="1..3"):
        adapter.forward_train(images, bad)


def test_state_dict_round_trip(name, adapter):
    other = build(name, seed=1)
    other.load_state_dict(adapter.state_dict())
    image = [torch.rand(3, 128, 128)]
    a, b = adapter.predict(image)[0], other.predict(image)[0]
    assert torch.allclose(a.boxes, b.boxes, atol=1e-4) and torch.allclose(a.raw_probs, b.raw_probs, atol=1e-5)


# --------------------------------------------------------------------------- negatives


@pytest.mark.parametrize("ssd", ["tiny_ssd", pytest.param("ssd300_vgg16", marks=pytest.mark.slow)])
def test_hard_ssd_loss_equals_torchvision_compute_loss(ssd):
    adapter = build(ssd)
    images, targets = batch(seed=3)
    ours = adapter.forward_train(images, targets, negatives="hard").losses
    reference = adapter.model(list(images), targets)  # train mode: torchvision's SSD.compute_loss
    assert torch.allclose(ours["cls"], reference["classification"], rtol=1e-5)
    assert torch.allclose(ours["box"], reference["bbox_regression"], rtol=1e-5)


def conf_losses(adapter, images, targets):
    """Per-anchor cross-entropy and positives, recomputed from torchvision's SSD pieces. [B, A] each."""
    model = adapter.model
    resized_images, resized = model.transform(list(images), targets)
    features = list(model.backbone(resized_images.tensors).values())
    head = model.head(features)
    anchors = model.anchor_generator(resized_images, features)
    labels = torch.zeros(head["cls_logits"].shape[:2], dtype=torch.int64)
    for i, (a, t) in enumerate(zip(anchors, resized)):
        if len(t["boxes"]):
            idx = model.proposal_matcher(box_iou(t["boxes"], a))
            labels[i, idx >= 0] = t["labels"][idx[idx >= 0]]
    ce = torch.nn.functional.cross_entropy(head["cls_logits"].transpose(1, 2), labels, reduction="none")
    return ce.detach(), labels > 0


def test_weak_ssd_negatives_are_the_easiest_third_of_the_hard_ones():
    adapter = build("tiny_ssd")
    images, targets = batch(seed=4)
    targets[1] = {"boxes": torch.tensor([[40.0, 40.0, 90.0, 100.0]]), "labels": torch.tensor([2])}
    losses = {mode: adapter.forward_train(images, targets, negatives=mode).losses for mode in ("hard", "weak", "none")}
    ce, positive = conf_losses(adapter, images, targets)
    num_pos = int(positive.sum())
    hard_sum = weak_sum = 0.0
    for row, pos in zip(ce, positive):  # naive reference: sort the negatives per image
        ranked = row[~pos].sort(descending=True).values
        hard = ranked[: 3 * int(pos.sum())]
        weak = hard[len(hard) - len(hard) // 3 :]
        assert len(weak) == int(pos.sum()) > 0  # weak mining keeps one negative per positive
        hard_sum, weak_sum = hard_sum + hard.sum(), weak_sum + weak.sum()
    positives = ce[positive].sum()
    assert losses["none"]["cls"].item() == pytest.approx((positives / num_pos).item(), rel=1e-5)
    assert losses["hard"]["cls"].item() == pytest.approx(((positives + hard_sum) / num_pos).item(), rel=1e-5)
    assert losses["weak"]["cls"].item() == pytest.approx(((positives + weak_sum) / num_pos).item(), rel=1e-5)
    assert losses["none"]["cls"] < losses["weak"]["cls"] < losses["hard"]["cls"]
    assert losses["weak"]["box"] == losses["hard"]["box"] == losses["none"]["box"]


@pytest.mark.parametrize("rcnn", ["fasterrcnn_mobilenet",
                                  pytest.param("fasterrcnn_resnet50_fpn", marks=pytest.mark.slow)])
def test_faster_rcnn_hard_equals_torchvision_and_weak_drops_sampled_negatives(rcnn):
    adapter = build(rcnn)
    images, targets = batch(seed=5)
    torch.manual_seed(7)  # the same random samples of anchors and proposals in both runs
    reference = adapter.model(list(images), targets)
    losses = {}
    for mode in ("hard", "weak", "none"):
        torch.manual_seed(7)
        losses[mode] = adapter.forward_train(images, targets, negatives=mode).losses
    pairs = {"rpn_cls": "loss_objectness", "rpn_box": "loss_rpn_box_reg", "roi_cls": "loss_classifier",
             "roi_box": "loss_box_reg"}
    for ours, theirs in pairs.items():
        assert losses["hard"][ours].item() == pytest.approx(reference[theirs].item(), rel=1e-4, abs=1e-7)
    for key in ("rpn_cls", "roi_cls"):
        assert losses["none"][key] < losses["weak"][key] < losses["hard"][key]
    assert losses["weak"]["roi_box"] == losses["hard"]["roi_box"]


def test_sampled_loss_keeps_the_lowest_third_of_each_images_negatives():
    loss = torch.tensor([5.0, 1.0, 2.0, 3.0, 4.0, 0.5, 9.0, 7.0, 8.0, 6.0])
    labels = [torch.tensor([1, 0, 0, 0, 0, 0, -1]), torch.tensor([0, 0, 0])]
    # image 0: positive 5.0, negatives 1, 2, 3, 4, 0.5 -> the easiest floor(5/3) = 1: 0.5; 6 sampled
    # image 1: negatives 7, 8, 6 -> the easiest one: 6; 3 sampled; 9 sampled examples in all
    assert sampled_loss(loss, labels, "weak").item() == pytest.approx((5.0 + 0.5 + 6.0) / 9)
    assert sampled_loss(loss, labels, "hard").item() == pytest.approx((5 + 1 + 2 + 3 + 4 + 0.5 + 7 + 8 + 6) / 9)
    assert sampled_loss(loss, labels, "none").item() == pytest.approx(5.0 / 9)


# --------------------------------------------------------------------------- tiny model, weights


def default_boxes(adapter, size: int = 128) -> torch.Tensor:
    x = torch.rand(1, 3, size, size)
    features = list(adapter.model.backbone(x).values())
    return adapter.model.anchor_generator(ImageList(x, [(size, size)]), features)[0]


@pytest.mark.parametrize(("first_stride", "cells", "channels"), [(4, [32, 16, 8, 4], [8, 16, 16, 16]),
                                                                  (8, [16, 8, 4, 2], [16, 16, 16, 16])])
def test_tiny_ssd_maps(first_stride, cells, channels):
    adapter = create_adapter("tiny_ssd", num_classes=K, width=16, first_stride=first_stride)
    maps = list(adapter.model.backbone(torch.rand(2, 3, 128, 128)).values())
    assert [m.shape[-1] for m in maps] == cells and [m.shape[1] for m in maps] == channels
    per_cell = [4, 6, 6, 4]  # two squares + 2 (ratio 2) or 4 (ratios 2, 3) boxes, as SSD300
    assert len(default_boxes(adapter)) == sum(c * c * n for c, n in zip(cells, per_cell))
    images, targets = batch()
    tap = adapter.forward_train(images, targets).features["conv4_3"]
    assert tap.shape == (2, 16, 16, 16)  # the stride-8 map in both layouts
    with pytest.raises(ValueError, match="multiple of"):
        create_adapter("tiny_ssd", num_classes=K, size=32 * 3, first_stride=8)


def test_dense_tiny_ssd_matches_every_object_with_several_default_boxes():
    """The reason ``first_stride=4`` is the default: SSD matching (IoU >= 0.5) gives each object
    several positives, and SRRS several supporting regions, as SSD300 does for VOC objects."""
    g = torch.Generator().manual_seed(0)
    side = torch.empty(300).uniform_(10, 80, generator=g)
    centre = torch.rand(300, 2, generator=g) * (128 - side[:, None]) + side[:, None] / 2
    objects = torch.cat([centre - side[:, None] / 2, centre + side[:, None] / 2], 1)
    matched = {}
    for first_stride in (4, 8):
        adapter = create_adapter("tiny_ssd", num_classes=K, width=16, first_stride=first_stride)
        matched[first_stride] = (box_iou(objects, default_boxes(adapter)) >= 0.5).sum(1)
    assert matched[4].min() >= 3 and matched[4].float().mean() > 5
    assert (matched[8] == 0).any() and matched[8].float().mean() < 2.5


def test_tiny_ssd_overfits_one_batch():
    adapter = build("tiny_ssd")
    images, targets = batch(seed=6)
    targets[1] = {"boxes": torch.tensor([[20.0, 30.0, 70.0, 90.0], [80.0, 60.0, 124.0, 120.0]]),
                  "labels": torch.tensor([2, 1])}
    opt = torch.optim.Adam(adapter.parameters(), lr=3e-3)
    first = None
    for _ in range(100):
        loss = sum(adapter.forward_train(images, targets).losses.values())
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first
    for pred, target in zip(adapter.predict(images), targets):  # and finds its boxes where they are
        confident = pred.scores > 0.5
        iou = box_iou(target["boxes"], pred.boxes[confident])
        same = target["labels"][:, None] == pred.labels[confident][None]
        assert ((iou > 0.5) & same).any(1).all()


@pytest.mark.parametrize("detector", ["ssd300_vgg16", "fasterrcnn_mobilenet", "fasterrcnn_resnet50_fpn",
                                      "fasterrcnn_vgg16"])
def test_backbone_weights_come_from_a_local_file_only(tmp_path, detector):
    with pytest.raises(DataError, match="never downloads"):
        create_adapter(detector, num_classes=K, backbone_weights=str(tmp_path / "missing.pth"))


def test_vgg_backbone_weights_land_in_the_ssd_backbone(tmp_path):
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(2)
    features = make_layers(cfgs["D"])  # the keys of torchvision's VGG-16 state dict: features.N.*
    path = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    backbone = create_adapter("ssd300_vgg16", num_classes=K, backbone_weights=str(path)).model.backbone
    assert torch.equal(backbone.features[0].weight, features[0].weight)  # conv1_1
    assert torch.equal(backbone.extra[0][5].weight, features[28].weight)  # conv5_3, after maxpool4
    assert not backbone.features[0].weight.requires_grad and backbone.features[5].weight.requires_grad


@pytest.mark.slow  # two VGG-16-sized models (137 M parameters) and a 0.5 GB weights file on disk
def test_faster_rcnn_vgg16_is_the_adaptive_detection_papers_detector(tmp_path):
    """conv5_3 at stride 16, fc6/fc7 from VGG's classifier, conv1-2 frozen with weights, 137 M
    parameters at 8 foreground classes + background (Cityscapes -> Foggy)."""
    from torchvision.models import vgg16

    torch.manual_seed(3)
    reference = vgg16(weights=None, num_classes=10)
    path = tmp_path / "vgg16.pth"
    torch.save(reference.state_dict(), path)
    model = create_adapter("fasterrcnn_vgg16", num_classes=8, backbone_weights=str(path)).model
    assert torch.equal(model.backbone.features[28].weight, reference.features[28].weight)  # conv5_3
    assert torch.equal(model.roi_heads.box_head.classifier[3].weight, reference.classifier[3].weight)  # fc7
    frozen = [n for n, p in model.backbone.named_parameters() if not p.requires_grad]
    assert frozen == [f"features.{i}.{k}" for i in (0, 2, 5, 7) for k in ("weight", "bias")]
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(136.8e6, rel=0.01)
    features = model.backbone(torch.rand(1, 3, 160, 224))["0"]
    assert features.shape == (1, 512, 10, 14)  # stride 16
    assert model.rpn.anchor_generator.sizes == ((128, 256, 512),) and model.transform.min_size == (600,)
    with pytest.raises(DataError, match="does not fit"):  # fc6/fc7 of width 64 cannot take VGG's
        create_adapter("fasterrcnn_vgg16", num_classes=8, backbone_weights=str(path), width=64)


@pytest.mark.parametrize("ours, theirs", [
    ("fasterrcnn_mobilenet", "fasterrcnn_mobilenet_v3_large_fpn"),
    pytest.param("fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn", marks=pytest.mark.slow),
    pytest.param("ssd300_vgg16", "ssd300_vgg16", marks=pytest.mark.slow)])
def test_builders_have_torchvisions_architecture(ours, theirs):
    import torchvision

    reference = torchvision.models.get_model(theirs, weights=None, weights_backbone=None, num_classes=K + 1)
    shapes = {k: v.shape for k, v in create_adapter(ours, num_classes=K).state_dict().items()}
    assert shapes == {k: v.shape for k, v in reference.state_dict().items()}


def test_faster_rcnn_backbone_weights_freeze_like_torchvision(tmp_path):
    from torchvision.models import mobilenet_v3_large
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(3)
    reference = mobilenet_v3_large()
    path = tmp_path / "mobilenet.pth"
    torch.save(reference.state_dict(), path)
    model = create_adapter("fasterrcnn_mobilenet", num_classes=K, backbone_weights=str(path)).model
    body = model.backbone.body
    assert torch.equal(body["0"][0].weight, reference.features[0][0].weight)
    assert any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    assert not body["0"][0].weight.requires_grad and body["16"][0].weight.requires_grad
