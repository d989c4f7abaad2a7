"""Bytes per image of the labeller's logit cache: at the network's output stride against the input size.

For each segmenter, pass 1 of the labeller (``CacheRecorder`` into a ``LogitCache``) runs over a
few random images at a small size, and the float16 scratch file is measured on disk; the same
images through ``predict`` (full-size logits, the cache before it kept the stride) give the
"before" figure. The output stride the measurement shows is then scaled to a Cityscapes image
(1024 x 2048, 19 classes): the network's output shape there comes from a forward pass on the meta
device (shapes only, no arithmetic), so the scaled figure is this implementation's, not a formula's.

The measured networks are narrow versions of the real ones (fewer channels, the same strides and
paddings, hence the same output shapes).

    python benchmarks/logit_cache.py [--height 65] [--width 129] [--images 4] [--models deeplabv2 ...]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch

from selftrain.adapters import create_adapter
from selftrain.pseudo import CacheRecorder, LogitCache
from selftrain.tta import TestTimeAugment

CITYSCAPES = (1024, 2048)
ROUND_IMAGES = 2975  # Cityscapes train: the target set of one round
OPTIONS = {  # narrow versions, same output stride as the full models
    "deeplabv2": {"depth": 50},
    "fcn_resnet50": {},
    "fcn8s_vgg16": {"width": 64},
    "resnet38": {"width_multiplier": 0.125},
    "tiny_seg": {},
}


def cache_bytes(adapter, images: torch.Tensor, folder: Path, stride: bool) -> int:
    """Size on disk of the float16 cache of ``images`` (one batch per image)."""
    cache = LogitCache(folder / f"{'stride' if stride else 'full'}.tmp")
    recorder = CacheRecorder(adapter, cache)
    with cache:
        for x in images.split(1):
            if stride:
                TestTimeAugment().predict(recorder, x)
            else:
                cache.write(adapter.predict(x).logits)
    size = cache.path.stat().st_size
    cache.remove()
    return size


def scaled_shape(name: str, classes: int, size: tuple[int, int]) -> tuple[int, ...]:
    """The network's output shape [C, h, w] for one image of ``size``, from a meta-device forward."""
    adapter = create_adapter(name, num_classes=classes, **OPTIONS[name])
    adapter.model.to("meta")
    return tuple(adapter.native_logits(torch.empty(1, 3, *size, device="meta")).shape[1:])


def measure(name: str, args, folder: Path) -> dict:
    torch.manual_seed(0)
    adapter = create_adapter(name, num_classes=args.classes, **OPTIONS[name])
    images = torch.randn(args.images, 3, args.height, args.width)
    stride = cache_bytes(adapter, images, folder, stride=True) / args.images
    full = cache_bytes(adapter, images, folder, stride=False) / args.images
    native = tuple(adapter.native_logits(images[:1]).shape[1:])
    big = scaled_shape(name, args.classes, CITYSCAPES)
    big_stride, big_full = 2 * math.prod(big), 2 * args.classes * math.prod(CITYSCAPES)
    return {
        "model": name, "input": [args.height, args.width], "native": list(native),
        "bytes_per_image": {"stride": stride, "full": full, "ratio": round(full / stride, 2)},
        "cityscapes": {"native": list(big), "stride_mb": round(big_stride / 1e6, 3), "full_mb": round(big_full / 1e6, 3),
                       "ratio": round(big_full / big_stride, 2),
                       "round_gb": {"stride": round(ROUND_IMAGES * big_stride / 1e9, 2),
                                    "full": round(ROUND_IMAGES * big_full / 1e9, 1)}},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=65)
    parser.add_argument("--width", type=int, default=129)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--models", nargs="+", default=sorted(OPTIONS), choices=sorted(OPTIONS))
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            r = measure(name, args, Path(tmp))
            reports.append(r)
            b, c = r["bytes_per_image"], r["cityscapes"]
            print(f"{name:14s} {args.height}x{args.width}: logits {'x'.join(map(str, r['native']))}, "
                  f"{b['stride']:10.0f} B/image at stride vs {b['full']:10.0f} B full size (x{b['ratio']:.1f}); "
                  f"1024x2048: {'x'.join(map(str, c['native']))} -> {c['stride_mb']:.3f} MB vs {c['full_mb']:.1f} MB "
                  f"(x{c['ratio']:.1f}), {ROUND_IMAGES} images {c['round_gb']['stride']} GB vs {c['round_gb']['full']} GB")
    print(json.dumps(reports))


if __name__ == "__main__":
    main()
