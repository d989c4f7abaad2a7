"""Multi-scale and flipped inference: the average of the views' probabilities, precisely."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from selftrain.adapters import create_adapter
from selftrain.tta import TestTimeAugment


@pytest.fixture
def adapter():
    torch.manual_seed(0)
    return create_adapter("tiny_seg", num_classes=4)


def test_identity_is_one_plain_forward(adapter):
    images = torch.randn(2, 3, 16, 24)
    assert torch.equal(TestTimeAugment().predict(adapter, images).logits, adapter.predict(images).logits)


def test_views_average_probabilities(adapter):
    images = torch.randn(2, 3, 16, 24)
    tta = TestTimeAugment(scales=(0.5, 1.0), flip=True)
    probs = []
    for scale in (0.5, 1.0):
        x = F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False) if scale != 1 else images
        for flip in (False, True):
            logits = adapter.predict(x.flip(-1) if flip else x).logits
            logits = logits.flip(-1) if flip else logits
            logits = F.interpolate(logits, size=(16, 24), mode="bilinear", align_corners=False)
            probs.append(logits.softmax(1))
    expected = torch.stack(probs).mean(0)
    out = tta.predict(adapter, images).logits
    assert out.shape == (2, 4, 16, 24)
    torch.testing.assert_close(out.softmax(1), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(2, 16, 24), atol=1e-5, rtol=1e-5)


def test_flip_of_a_mirror_symmetric_input_changes_nothing(adapter):
    images = torch.randn(1, 3, 16, 12)
    images = torch.cat([images, images.flip(-1)], dim=-1)
    plain = TestTimeAugment().predict(adapter, images).logits.log_softmax(1)
    flipped = TestTimeAugment(flip=True).predict(adapter, images).logits
    assert flipped.shape == plain.shape and torch.isfinite(flipped).all()


def test_confident_pixels_keep_precise_costs():
    class Confident:
        def predict(self, x):
            from selftrain.types import SegPrediction

            logits = torch.zeros(x.shape[0], 2, *x.shape[-2:])
            logits[:, 0] = 40.0  # p(other) = e^-40: saturates softmax in float32
            return SegPrediction(logits=logits)

    out = TestTimeAugment(scales=(1.0, 0.5), flip=True).predict(Confident(), torch.zeros(1, 3, 8, 8)).logits
    log_p = out.log_softmax(1)
    assert log_p[0, 1].mean().item() == pytest.approx(-40.0, abs=1e-3)
    assert log_p[0, 0].mean().item() == pytest.approx(-math.exp(-40.0), abs=1e-12)


def test_bad_scales():
    with pytest.raises(ValueError, match="positive"):
        TestTimeAugment(scales=(0.0,))


def test_recipe_keys_reach_the_run_data(tiny_recipe):
    from selftrain.build import build_data
    from selftrain.config import ConfigError, load_recipe

    cfg = load_recipe(tiny_recipe, ["eval.scales=[0.5, 0.75, 1.0]", "eval.flip=true", "policy.flip=true"])
    data = build_data(cfg)
    assert data.eval_tta == TestTimeAugment(scales=(0.5, 0.75, 1.0), flip=True)
    assert data.pseudo_tta == TestTimeAugment(scales=(1.0,), flip=True)
    with pytest.raises(ConfigError, match="eval.scales"):
        load_recipe(tiny_recipe, ["eval.scales=[0]"])


def test_synthia_label_space_declares_miou13_and_evaluation_reports_it():
    import numpy as np
    import torch

    from selftrain.adapters import create_adapter
    from selftrain.data import subset_metrics
    from selftrain.data.segsets import SYNTHIA_13, SYNTHIA_16_NAMES
    from selftrain.phases import RunData
    from selftrain.tasks import build_task

    assert subset_metrics([n.replace(" ", "_") for n in SYNTHIA_16_NAMES]) == {"miou13": SYNTHIA_13}
    assert subset_metrics([f"c{i}" for i in range(16)]) == {}
    torch.manual_seed(0)
    samples = [{"image": torch.randn(3, 16, 32), "label": torch.randint(0, 4, (16, 32)), "id": str(i)} for i in range(3)]
    data = RunData(source=[], target=[], target_val=None, num_classes=4, class_names=list("abcd"), eval_batch=2,
                   subset_metrics={"m01": (0, 1)})
    result = build_task("segmentation", data).evaluate(create_adapter("tiny_seg", num_classes=4, width=4), samples,
                                                       device="cpu", desc="eval")
    iou = [np.nan if v is None else v for v in result["iou"]]
    assert result["m01"] == pytest.approx(np.nanmean(iou[:2]))
