"""Feature taps, RoI records and label-free RoI sampling of the detection adapters, and tiny_frcnn."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from selftrain.adapters import ADAPTERS, create_adapter
from selftrain.cli import main
from selftrain.errors import ConfigError
from selftrain.phases import _target_outputs
from selftrain.tasks import DetectionTask, det_collate
from selftrain.types import RoIRecord, Tap, TapError

K = 3
SMALL = {"tiny_frcnn": {}, "fasterrcnn_vgg16": {"min_size": 128, "max_size": 128, "width": 64},
         "fasterrcnn_resnet50_fpn": {"min_size": 128, "max_size": 128}}
EXPECTED = {
    "fasterrcnn_vgg16": {"pool2": (128, 4), "relu3_2": (256, 4), "relu3_3": (256, 4), "pool3": (256, 8),
                         "relu4_2": (512, 8), "pool4": (512, 16), "relu5_3": (512, 16)},
    "fasterrcnn_resnet50_fpn": {"body.layer1": (256, 4), "body.layer2": (512, 8), "body.layer3": (1024, 16),
                                "body.layer4": (2048, 32)},
    "tiny_frcnn": {"pool2": (32, 4), "relu3_2": (64, 4), "relu3_3": (64, 4), "pool3": (64, 8), "relu4_2": (128, 8),
                   "relu4_3": (128, 8)},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def build(name: str = "tiny_frcnn", seed: int = 0, **options):
    torch.manual_seed(seed)
    adapter = create_adapter(name, num_classes=K, **{**SMALL[name], **options})
    adapter.model.rpn._pre_nms_top_n = {"training": 200, "testing": 100}
    adapter.model.rpn._post_nms_top_n = {"training": 64, "testing": 50}
    adapter.model.roi_heads.fg_bg_sampler.batch_size_per_image = 32
    return adapter


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = 0.2 * torch.rand(2, 3, 128, 128, generator=g)
    boxes = torch.tensor([[8.0, 10.0, 60.0, 70.0], [70.0, 20.0, 120.0, 110.0]])
    for (x1, y1, x2, y2), c in zip(boxes.int().tolist(), (0, 2)):
        images[0, c, y1:y2, x1:x2] = 0.9
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 3])},
               {"boxes": torch.tensor([[30.0, 80.0, 56.0, 124.0]]), "labels": torch.tensor([2])}]
    return images, targets


# --------------------------------------------------------------------------- taps


@pytest.mark.parametrize("name", ["tiny_frcnn", "fasterrcnn_vgg16",
                                  pytest.param("fasterrcnn_resnet50_fpn", marks=pytest.mark.slow)])
def test_declared_taps_have_the_channels_and_strides_of_their_maps(name):
    adapter = build(name)
    taps = adapter.feature_taps()
    assert {t: (v.channels, v.stride) for t, v in taps.items()} == EXPECTED[name]
    assert all(isinstance(v, Tap) and v.name == t for t, v in taps.items())
    images, targets = batch()
    assert not set(taps) & set(adapter.forward_train(images, targets).features)  # nothing unless requested
    assert adapter.request_taps(list(taps)) == taps
    out = adapter.forward_train(images, targets)
    for t, tap in taps.items():
        assert out.features[t].shape == (2, tap.channels, 128 // tap.stride, 128 // tap.stride), t
        assert out.features[t].requires_grad
    sum(out.losses.values()).backward()


def test_an_unknown_tap_is_one_config_error_listing_the_valid_ones():
    adapter = build()
    with pytest.raises(TapError, match="tiny_frcnn has no feature tap 'pool4'; its taps: pool2, relu3_2, relu3_3, "
                                       "pool3, relu4_2, relu4_3$") as err:
        adapter.request_taps(["pool2", "pool4"])
    assert isinstance(err.value, ConfigError) and isinstance(err.value, ValueError)
    assert adapter.tap_table.requested == {}  # a failed request records nothing
    mobilenet = create_adapter("fasterrcnn_mobilenet", num_classes=K)
    with pytest.raises(TapError, match="fasterrcnn_mobilenet has no feature tap 'body.layer1'; its taps: none"):
        mobilenet.request_taps(["body.layer1"])


def test_a_frozen_tap_names_the_frozen_layers_and_the_option_that_trains_them():
    vgg = build("fasterrcnn_vgg16", trainable_backbone_layers=3)  # conv1, conv2 frozen, as with ImageNet weights
    with pytest.raises(TapError, match=r"tap 'relu4_2' of fasterrcnn_vgg16 cannot align anything: .*\(backbone"
                                       r"\.features\.0, backbone\.features\.2, backbone\.features\.5, backbone"
                                       r"\.features\.7\); set model\.options\.trainable_backbone_layers: 5"):
        vgg.request_taps(["relu4_2"])
    assert build("fasterrcnn_vgg16", trainable_backbone_layers=5).request_taps(["pool2"])
    tiny = build()
    tiny.model.backbone.features.conv3_1.weight.requires_grad_(False)
    assert tiny.request_taps(["pool2"])  # below the frozen layer: fine
    with pytest.raises(TapError, match=r"\(backbone\.features\.conv3_1\)"):
        tiny.request_taps(["relu3_2"])


def test_ssd_offers_conv4_3_and_no_rois():
    ssd = create_adapter("tiny_ssd", num_classes=K, width=16)
    assert ssd.feature_taps() == {"conv4_3": Tap("conv4_3", 16, 8)}
    ssd.request_taps(["conv4_3"])
    with pytest.raises(TapError, match="single-stage detector without RoIs"):
        ssd.request_rois()


# --------------------------------------------------------------------------- RoI records


def test_rois_appear_only_when_requested_and_describe_the_forward():
    adapter = build()
    images, targets = batch()
    assert adapter.forward_train(images, targets).rois is None
    adapter.request_rois()
    torch.manual_seed(3)
    out = adapter.forward_train(images, targets)
    rois = out.rois
    assert isinstance(rois, RoIRecord) and rois.pooled is None
    assert rois.counts == [len(b) for b in rois.boxes] and sum(rois.counts) == len(out.logits) == 64
    assert rois.logits is out.logits and rois.regression.shape == (64, 4 * (K + 1))
    assert [len(x) for x in rois.labels] == [len(x) for x in rois.objectness] == rois.counts
    assert all(((o >= 0) & (o <= 1)).all() for o in rois.objectness)
    assert rois.image_sizes == [(128, 128), (128, 128)] and rois.input.shape == (2, 3, 128, 128)
    assert torch.allclose(rois.input, images, atol=1e-5)  # 128 px in, no resize: the images themselves
    assert not rois.refined.requires_grad and rois.refined.shape == (64, 4)
    assert (rois.refined >= 0).all() and (rois.refined <= 128).all()
    # the labelled sample is torchvision's select_training_samples, draw for draw
    m = adapter.model
    torch.manual_seed(3)
    batch_, resized = m.transform(list(images), [dict(t) for t in targets])
    features = m.backbone(batch_.tensors)
    proposals, _, _ = adapter._rpn(batch_, features, resized, "hard", True)
    theirs, _, labels, _ = m.roi_heads.select_training_samples(proposals, resized)
    for ours, ref, lab, ref_lab in zip(rois.boxes, theirs, rois.labels, labels):
        assert torch.equal(ours, ref) and torch.equal(lab, ref_lab)
    assert all((lab > 0).any() for lab in rois.labels)


def test_pooled_features_on_request_carry_the_graph():
    adapter = build()
    adapter.request_rois(pooled=True)
    images, targets = batch()
    out = adapter.forward_train(images, targets)
    channels = adapter.model.backbone.out_channels
    assert out.rois.pooled.shape == (sum(out.rois.counts), channels, 7, 7) and out.rois.pooled.requires_grad
    out.rois.pooled.pow(2).mean().backward()
    assert adapter.model.backbone.features.conv1_1.weight.grad.abs().sum() > 0


def proposals_of(adapter, images):
    """The post-NMS proposals and objectness of a train-mode forward without targets."""
    m = adapter.model
    batch_, _ = m.transform(list(images))
    proposals, scores, _ = adapter._rpn(batch_, m.backbone(batch_.tensors), None, "hard", True)
    return proposals, scores


def test_unlabelled_rois_default_pools_every_proposal():
    adapter = build()
    adapter.request_rois()
    images, _ = batch()
    out = adapter.forward_train(images)
    assert out.rois.labels is None and out.losses == {}
    proposals, _ = proposals_of(adapter, images)
    assert out.rois.counts == [len(p) for p in proposals] and all(torch.equal(a, b)
                                                                   for a, b in zip(out.rois.boxes, proposals))


@pytest.mark.parametrize("mode", ["random", "top"])
def test_unlabelled_rois_sample_n_proposals_per_image(mode):
    adapter = build(unlabelled_rois={"n": 16, "mode": mode})
    adapter.request_rois()
    images, _ = batch()
    out = adapter.forward_train(images)
    assert out.rois.counts == [16, 16] and out.logits.shape == (32, K + 1) and out.features["roi"].shape[0] == 32
    proposals, scores = proposals_of(adapter, images)
    for boxes, objectness, props, score in zip(out.rois.boxes, out.rois.objectness, proposals, scores):
        assert (boxes[:, None] == props[None]).all(-1).any(1).all()  # every RoI is one of the proposals
        if mode == "top":
            assert torch.equal(objectness, score.sort(descending=True).values[:16])


@pytest.mark.parametrize("value, message", [
    ({"n": 0}, "unlabelled_rois.n must be an integer >= 1, got 0"),
    ({"n": 8, "mode": "all"}, "unlabelled_rois.mode must be one of random, top, got 'all'"),
    ({"n": 8, "count": 2}, "unlabelled_rois must be {n: int, mode: random|top}"),
    (128, "unlabelled_rois must be"),
])
def test_a_bad_unlabelled_rois_option_is_one_config_error(value, message):
    for name in ("tiny_frcnn", "fasterrcnn_vgg16", "fasterrcnn_mobilenet"):
        with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("|", r"\|")):
            create_adapter(name, num_classes=K, unlabelled_rois=value)


def test_a_bad_unlabelled_rois_recipe_is_one_line_and_exit_2(tmp_path):
    result = CliRunner().invoke(main, ["run", "det_fog_source", "--out", str(tmp_path / "run"), "--quiet",
                                       "--set", "model.options.unlabelled_rois={n: 8, mode: best}"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "unlabelled_rois.mode must be one of random, top" in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("mode", ["random", "top"])
def test_the_target_forward_never_reads_target_boxes(mode):
    """The engine's target forward (``target_use: forward``) on a collated batch whose boxes are
    changed or removed gives the same RoIs, logits and taps, and the adapter never sees a box."""
    adapter = build(unlabelled_rois={"n": 16, "mode": mode})
    adapter.request_rois()
    adapter.request_taps(["pool2"])
    images, targets = batch()
    seen = []
    forward = adapter.forward_train

    def spy(images, targets=None, **kwargs):
        seen.append(targets)
        return forward(images, targets, **kwargs)

    adapter.forward_train = spy
    phase, task = SimpleNamespace(target_use="forward"), DetectionTask(None)
    variants = [targets, [{"boxes": t["boxes"] * 0.5 + 3, "labels": t["labels"] % K + 1} for t in targets],
                [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2]
    outs = []
    for variant in variants:
        samples = [{"image": im, "boxes": t["boxes"], "labels": t["labels"], "id": str(i)}
                   for i, (im, t) in enumerate(zip(images, variant))]
        torch.manual_seed(11)
        outs.append(_target_outputs(phase, det_collate(samples), 0, adapter=adapter, task=task, device="cpu",
                                    teacher=None, policy=None))
    assert seen == [None, None, None]
    for other in outs[1:]:
        assert other.rois.labels is None and torch.equal(other.logits, outs[0].logits)
        assert all(torch.equal(a, b) for a, b in zip(other.rois.boxes, outs[0].rois.boxes))
        assert torch.equal(other.features["pool2"], outs[0].features["pool2"])


# --------------------------------------------------------------------------- tiny_frcnn


def test_tiny_frcnn_is_registered_with_the_detectors():
    assert ADAPTERS.entry("tiny_frcnn").supports("detection")
    with pytest.raises(ConfigError, match="norm must be one of group, none"):
        create_adapter("tiny_frcnn", num_classes=K, norm="batch")


@pytest.mark.parametrize("norm", ["group", "none"])
def test_a_target_forward_in_train_mode_moves_no_statistics(norm):
    """No buffer, no parameter changes without an optimiser step, and no batch norm exists; the
    same forward moves tiny_ssd's running statistics (what this detector is built to avoid)."""
    adapter = build(norm=norm)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in adapter.model.modules())
    before = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    images, _ = batch()
    adapter.forward_train(images * 3.0)
    after = adapter.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    ssd = create_adapter("tiny_ssd", num_classes=K, width=16)
    stats = {k: v.clone() for k, v in ssd.model.named_buffers() if "running_mean" in k}
    ssd.forward_train(images * 3.0)
    moved = dict(ssd.model.named_buffers())
    assert stats and any(not torch.equal(v, moved[k]) for k, v in stats.items())


@pytest.mark.slow
def test_tiny_frcnn_learns_one_batch():
    adapter = build()
    images, targets = batch(seed=6)
    opt = torch.optim.Adam(adapter.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        loss = sum(adapter.forward_train(images, targets).losses.values())
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
