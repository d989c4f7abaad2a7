"""The labeller caches logits at the network's output stride and still selects exactly what the
full-size path selects: thresholds, labels and confidences equal bit for bit, for every segmenter
family that builds without pretrained weights, with and without test-time augmentation.

The full-size path is written here independently of the cache: ``predict`` of the same network
with its output rounded to float16 (the cache's precision) gives every image's full-size logits in
memory, and the policy observes, fits exactly and selects on those.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from selftrain.adapters import create_adapter
from selftrain.adapters.segmentation import SegmentationAdapter
from selftrain.policies import create_policy
from selftrain.pseudo import LogitCache, label_target
from selftrain.store import PseudoLabelWriter, RoundMeta, open_round
from selftrain.tta import TestTimeAugment
from selftrain.types import SegPrediction

C = 5
# family: (builder options, input size, output stride); sizes not divisible by the stride on purpose
FAMILIES = {
    "tiny_seg": ({"width": 8}, (22, 30), 2),
    "deeplabv2": ({"depth": 50}, (41, 57), 8),
    "fcn_resnet50": ({}, (41, 57), 8),
    "fcn8s_vgg16": ({"width": 16}, (40, 56), 8),
    "resnet38": ({"width_multiplier": 1 / 32}, (41, 57), 8),
    "smp_unet": ({"encoder": "resnet18", "decoder_channels": [16, 16, 16, 16, 16]}, (32, 64), 1),
}


def make_adapter(name: str, seed: int = 0) -> SegmentationAdapter:
    """A random network of the family whose logits spread over the classes (std ~2, zero mean per
    class on random images): its classifier layers are redrawn, rescaled and re-centred."""
    torch.manual_seed(seed)
    options, size, _ = FAMILIES[name]
    adapter = create_adapter(name, num_classes=C, **options)
    scores = [m for m in adapter.model.modules() if isinstance(m, nn.Conv2d) and m.out_channels == C]
    with torch.no_grad():
        for m in scores:
            nn.init.normal_(m.weight, 0.0, 1.0 / math.sqrt(m.weight[0].numel()))
            nn.init.zeros_(m.bias)
        z = adapter.native_logits(torch.randn(4, 3, *size))
        for m in scores:  # the score layers add up linearly: scaling each scales the logits
            m.weight *= 2.0 / z.std().item()
        scores[-1].bias -= adapter.native_logits(torch.randn(4, 3, *size)).mean(dim=(0, 2, 3))
    return adapter


class HalfOutput(nn.Module):
    """The network with its output rounded to float16, the precision of the labeller's cache."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).half().float()


class RandomImages(Dataset):
    def __init__(self, n: int, size: tuple[int, int], seed: int = 1) -> None:
        self.images = torch.randn((n, 3, *size), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        image = self.images[i]
        return {"image": image, "label": torch.zeros(image.shape[-2:], dtype=torch.int64), "id": f"im{i}"}


def make_policy(name: str, size: tuple[int, int]):
    if name == "cbst_sp":
        q = np.random.default_rng(2).random((C, *size)) + 1e-3
        return create_policy(name, prior=q / q.sum(axis=(1, 2), keepdims=True))
    return create_policy(name)


def stride_path(adapter, policy, data, tmp_path, monkeypatch, tta, portion=0.35, batch=2):
    """label_target as the engine runs it; returns (thresholds, labels [N,H,W], confidence, cache bytes)."""
    written = []
    original = LogitCache.write

    def counting(self, logits):
        written.append(tuple(logits.shape))
        return original(self, logits)

    path = tmp_path / "round_001.h5"
    writer = PseudoLabelWriter(path, RoundMeta(task="segmentation", round=1, policy=policy.name, portion=portion,
                                               num_classes=C, class_names=[f"c{i}" for i in range(C)]))
    monkeypatch.setattr(LogitCache, "write", counting)
    with writer:
        label_target(adapter=adapter, policy=policy, dataset=data, portion=portion, writer=writer,
                     scratch=tmp_path / "logits.tmp", batch_size=batch, device=torch.device("cpu"),
                     ignore_index=255, tta=tta)
    assert not (tmp_path / "logits.tmp").exists()
    reader = open_round(path)
    labels = np.stack([reader.labels(i) for i in range(len(data))])
    conf = np.stack([reader.confidence(i) for i in range(len(data))])
    return np.asarray(reader.thresholds), labels, conf, sum(2 * math.prod(s) for s in written)


def full_size_path(adapter, policy, data, tta, portion=0.35, batch=2):
    """Every image's full-size logits through ``predict`` in memory; observe, exact fit, select."""
    rounded = SegmentationAdapter(model=HalfOutput(adapter.model), num_classes=C)
    images = data.images
    logits = [tta.predict(rounded, images[i:i + batch]).logits for i in range(0, len(images), batch)]
    policy.reset()
    for z in logits:
        policy.observe(SegPrediction(logits=z))
    thresholds = policy.fit(portion, replay=lambda: (SegPrediction(logits=z) for z in logits))
    chosen = [policy.select_with_confidence(SegPrediction(logits=z)) for z in logits]
    labels = torch.cat([c.labels for c in chosen]).numpy().astype(np.uint8)
    conf = torch.cat([c.confidence for c in chosen]).half().float().numpy()
    return thresholds.numpy(), labels, conf


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_native_logits_upsampled_equal_predict(name):
    adapter = make_adapter(name)
    _, size, stride = FAMILIES[name]
    x = torch.randn(2, 3, *size)
    native = adapter.native_logits(x)
    assert native.shape[-2:] == tuple(math.ceil(s / stride) for s in size)
    assert torch.equal(adapter.upsample_logits(native, size), adapter.predict(x).logits)


@pytest.mark.parametrize("policy_name", ["cbst", "cbst_sp"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_stride_cache_selects_what_the_full_size_path_selects(name, policy_name, tmp_path, monkeypatch):
    adapter = make_adapter(name)
    _, size, stride = FAMILIES[name]
    data = RandomImages(5, size)
    tta = TestTimeAugment()
    thr, labels, conf, cached = stride_path(adapter, make_policy(policy_name, size), data, tmp_path, monkeypatch, tta)
    ref_thr, ref_labels, ref_conf = full_size_path(adapter, make_policy(policy_name, size), data, tta)
    assert np.array_equal(thr, ref_thr)
    assert np.array_equal(labels, ref_labels)
    assert np.array_equal(conf, ref_conf)
    assert 0 < (labels != 255).mean() < 1 and len(np.unique(labels)) > 2  # a selection worth comparing
    native = tuple(math.ceil(s / stride) for s in size)
    assert cached == len(data) * C * math.prod(native) * 2  # the cache holds the stride, not the input size


@pytest.mark.parametrize("name", ["tiny_seg", "deeplabv2"])
def test_test_time_views_are_cached_at_their_stride(name, tmp_path, monkeypatch):
    adapter = make_adapter(name)
    _, size, stride = FAMILIES[name]
    data = RandomImages(4, size)
    tta = TestTimeAugment(scales=(0.5, 1.0), flip=True)
    thr, labels, conf, cached = stride_path(adapter, make_policy("cbst_sp", size), data, tmp_path, monkeypatch, tta)
    ref_thr, ref_labels, ref_conf = full_size_path(adapter, make_policy("cbst_sp", size), data, tta)
    assert np.array_equal(thr, ref_thr)
    assert np.array_equal(labels, ref_labels)
    assert np.array_equal(conf, ref_conf)
    half = tuple(math.ceil(math.floor(s * 0.5) / stride) for s in size)
    full = tuple(math.ceil(s / stride) for s in size)
    assert cached == 2 * len(data) * C * (math.prod(half) + math.prod(full)) * 2  # two flips per scale
    assert cached < len(data) * C * math.prod(size) * 2
