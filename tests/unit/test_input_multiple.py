"""Models whose encoder needs image sides divisible by its stride say so in one line, at build time
for the crop and at the forward pass for whole images, instead of smp's RuntimeError."""

import pytest
import torch

from selftrain.adapters import ADAPTERS
from selftrain.build import build_adapter
from selftrain.catalog import builtin_path
from selftrain.config import load_recipe
from selftrain.errors import ConfigError


def test_an_smp_encoder_declares_its_stride_and_refuses_other_sizes():
    adapter = ADAPTERS.entry("smp_deeplabv3plus").build(num_classes=3, encoder="resnet18")
    assert adapter.input_multiple == adapter.model.encoder.output_stride == 16
    assert adapter.predict(torch.zeros(1, 3, 64, 128)).logits.shape == (1, 3, 64, 128)
    with pytest.raises(ConfigError, match=r"^an image of 60x128 does not fit the model, whose encoder needs sides "
                                          r"divisible by 16; set augment.crop to multiples of 16, e.g. \[64, 128\]"):
        adapter.predict(torch.zeros(1, 3, 60, 128))


def test_models_that_take_any_size_declare_none():
    assert ADAPTERS.entry("smp_unet").build(num_classes=3).input_multiple == 1  # smp pads the U-Net itself
    assert ADAPTERS.entry("tiny_seg").build(num_classes=3).input_multiple == 1


def test_a_crop_the_encoder_cannot_take_is_refused_when_the_model_is_built():
    cfg = load_recipe(builtin_path("synth_cbst"), ["augment.crop=[60, 100]", "model.name=smp_deeplabv3plus",
                                                   "model.options={encoder: resnet18}"])
    with pytest.raises(ConfigError, match=r"^augment.crop \[60, 100\]: a crop of 60x100 does not fit .* \[64, 112\]"):
        build_adapter(cfg)
