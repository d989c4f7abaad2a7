"""Segmentation adapters: segmentation-models-pytorch architectures and a tiny test model.

Every adapter wraps one ``nn.Module`` whose output is logits at the network's output stride (the
input size for smp's models, which upsample inside their head); ``predict`` and ``forward_train``
upsample them bilinearly to the input size, and ``native_logits`` hands the labeller the logits
before that step, with ``upsample_logits`` to finish it exactly as ``predict`` does.
Weights come only from local files named in the recipe; nothing is ever downloaded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from selftrain.errors import ConfigError, DataError
from selftrain.types import SegPrediction, StepOutputs

from .registry import ADAPTERS

log = logging.getLogger(__name__)


class SegmentationAdapter:
    """Adapter contract for segmenters.

    ``predict(images)`` runs in eval mode without gradients and returns a :class:`SegPrediction`
    for the whole batch; ``forward_train(images, targets)`` runs in train mode and returns
    ``StepOutputs(losses={"ce": ...}, logits, features)``. Shapes: images [B, 3, H, W] float32,
    targets [B, H, W] int64 with ``ignore_index``. ``head_parameters()`` lists the classifier on
    top of the backbone (smp's segmentation head, DeepLab-v2's ASPP), or None, for
    ``optim.head_lr_mult``.
    """

    task = "segmentation"

    def __init__(self, *, model: nn.Module, num_classes: int, ignore_index: int = 255,
                 channels_last: bool = False, head: nn.Module | None = None, input_multiple: int = 1) -> None:
        self.model = model
        # Image sides must be multiples of this (smp encoders: their output stride, 32 for ResNets).
        self.input_multiple = input_multiple
        self.head = head  # the layers on top of the pretrained backbone (``head_parameters``)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        # NHWC runs oneDNN convolutions about 20 % faster on CPU for these models.
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)

    def to(self, device: str | torch.device) -> "SegmentationAdapter":
        self.model.to(device)
        return self

    def parameters(self):
        return self.model.parameters()

    def head_parameters(self) -> list[nn.Parameter] | None:
        """The classifier's parameters, which ``optim.head_lr_mult`` trains at a higher learning rate
        (DeepLab's 10x on ASPP); None for a model without a separate head."""
        return None if self.head is None else list(self.head.parameters())

    def feature_channels(self) -> dict[str, int]:
        """Segmenters expose no feature taps (output-space alignment works on the logits)."""
        return {}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> SegPrediction:
        """Logits at the input size [B, C, H, W], eval mode, no gradients."""
        self.model.eval()
        return SegPrediction(logits=self._logits(images))

    @torch.no_grad()
    def native_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The network's logits at its output stride [B, C, h, w], eval mode, no gradients.

        ``upsample_logits(native_logits(x), x.shape[-2:])`` equals ``predict(x).logits`` bit for bit:
        the labeller caches these (64x smaller at stride 8) and upsamples them when it reads them.
        """
        self.model.eval()
        return self._network(images)

    @staticmethod
    def upsample_logits(logits: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
        """Logits [B, C, h, w] -> [B, C, *size]: bilinear, ``align_corners=False``, as ``predict`` does."""
        if logits.shape[-2:] != tuple(size):
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
        return logits

    def forward_train(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> StepOutputs:
        self.model.train()
        logits = self._logits(images)
        losses = {}
        if targets is not None:
            losses["ce"] = cross_entropy(logits, targets, self.ignore_index)
        return StepOutputs(losses=losses, logits=logits, features={})

    def _network(self, images: torch.Tensor) -> torch.Tensor:
        check_input_size(tuple(images.shape[-2:]), self.input_multiple)
        return self.model(images.contiguous(memory_format=self.memory_format))

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.upsample_logits(self._network(images), images.shape[-2:])

    def state_dict(self) -> dict[str, Any]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)


def check_input_size(size: tuple[int, int], multiple: int, what: str = "an image of") -> None:
    """ConfigError unless both sides of ``size`` (H, W) are multiples of ``multiple``, naming the
    nearest sizes that are."""
    h, w = size
    if multiple > 1 and (h % multiple or w % multiple):
        up = [-(-side // multiple) * multiple for side in (h, w)]
        raise ConfigError(f"{what} {h}x{w} does not fit the model, whose encoder needs sides divisible by "
                          f"{multiple}; set augment.crop to multiples of {multiple}, e.g. [{up[0]}, {up[1]}], or "
                          "resize the data set (its resize option)")


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean cross-entropy over labelled pixels; exactly 0 (with a graph) when none is labelled."""
    if not (targets != ignore_index).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, targets, ignore_index=ignore_index)


def load_weights(module: nn.Module, path: str, what: str) -> None:
    """Load a local state dict (torchvision/timm/smp checkpoints; ``state_dict``/``model`` wrappers)."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{what} weights file {file} does not exist; selftrain never downloads weights: "
                        "put the file there or remove the option from the recipe")
    state = torch.load(file, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    own = module.state_dict()
    shared = [k for k in state if k in own]
    if not shared:
        raise DataError(f"{what} weights file {file} matches none of the model's parameters; "
                        "check that it belongs to this architecture")
    try:
        module.load_state_dict({k: state[k] for k in shared}, strict=False)
    except RuntimeError as exc:
        raise DataError(f"{what} weights file {file} does not fit the model: {str(exc).splitlines()[0]}") from None
    log.info("loaded %s weights from %s (%d of %d tensors)", what, file, len(shared), len(own))


def _smp_model(arch: str, *, num_classes: int, encoder: str, encoder_weights: str | None,
               **options: Any) -> nn.Module:
    import inspect

    import segmentation_models_pytorch as smp

    cls = getattr(smp, arch)
    named = [n for n, p in inspect.signature(cls).parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    unknown = sorted(set(options) - set(named))
    if unknown:  # smp swallows unknown keywords (a ``**kwargs`` it only warns about): a typo would pass
        valid = sorted(set(named) - {"encoder_name", "encoder_weights", "classes"})
        raise TypeError(f"{arch} got an unexpected keyword argument {unknown[0]!r}; valid: {', '.join(valid)}")
    model = cls(encoder_name=encoder, encoder_weights=None, classes=num_classes, **options)
    if encoder_weights:
        load_weights(model.encoder, encoder_weights, f"{encoder} encoder")
    return model


def _register_smp(name: str, arch: str, default_encoder: str) -> None:
    def build(*, num_classes: int, ignore_index: int = 255, encoder: str = default_encoder,
              encoder_weights: str | None = None, channels_last: bool = False, **options: Any) -> SegmentationAdapter:
        model = _smp_model(arch, num_classes=num_classes, encoder=encoder,
                           encoder_weights=encoder_weights, **options)
        multiple = model.encoder.output_stride if getattr(model, "requires_divisible_input_shape", True) else 1
        return SegmentationAdapter(model=model, num_classes=num_classes, ignore_index=ignore_index,
                                   channels_last=channels_last, head=model.segmentation_head,
                                   input_multiple=int(multiple))

    build.__doc__ = f"segmentation-models-pytorch {arch} (encoder {default_encoder} by default)."
    ADAPTERS.register(name, task="segmentation")(build)


_register_smp("smp_deeplabv3plus", "DeepLabV3Plus", "resnet101")
_register_smp("smp_deeplabv3", "DeepLabV3", "resnet101")
_register_smp("smp_fpn", "FPN", "resnet50")
_register_smp("smp_unet", "Unet", "resnet18")


class TinySegNet(nn.Module):
    """A three-layer conv net with one stride-2 stage: fast enough for end-to-end tests."""

    def __init__(self, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        )
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@ADAPTERS.register("tiny_seg", task="segmentation")
def tiny_seg(*, num_classes: int, ignore_index: int = 255, width: int = 16) -> SegmentationAdapter:
    """The tiny test segmenter (stride 2, upsampled to the input size)."""
    model = TinySegNet(num_classes, width)
    return SegmentationAdapter(model=model, num_classes=num_classes, ignore_index=ignore_index, head=model.head)
