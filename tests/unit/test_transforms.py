"""Training views: flips, crops, random scale and rare-class hard-sample mining."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from selftrain.data.transforms import Augment


class OneImage(Dataset):
    def __init__(self, label: torch.Tensor) -> None:
        self.label = label

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> dict:
        h, w = self.label.shape
        image = torch.arange(3 * h * w, dtype=torch.float32).view(3, h, w)
        return {"image": image, "label": self.label.clone(), "id": "x"}


def test_mined_crops_are_centred_on_rare_pixels():
    label = torch.zeros(64, 128, dtype=torch.int64)
    label[5, 120] = 7  # one rare pixel in a corner
    view = Augment(OneImage(label), flip=False, crop=(16, 16), mine_classes=[7], mine_probability=1.0)
    torch.manual_seed(0)
    assert all((view[0]["label"] == 7).any() for _ in range(20))
    plain = Augment(OneImage(label), flip=False, crop=(16, 16))
    assert sum(int((plain[0]["label"] == 7).any()) for _ in range(40)) < 10


def test_crop_pads_small_images_with_ignore_and_keeps_image_label_aligned():
    label = torch.arange(8 * 8).view(8, 8) % 5
    out = Augment(OneImage(label), flip=False, crop=(12, 10))[0]
    assert out["image"].shape == (3, 12, 10) and out["label"].shape == (12, 10)
    assert (out["label"][8:] == 255).all() and (out["label"][:, 8:] == 255).all()


def test_flip_mirrors_image_and_label_together():
    label = torch.arange(4 * 6).view(4, 6)
    view = Augment(OneImage(label), flip=True)
    torch.manual_seed(1)
    outs = [view[0] for _ in range(10)]
    flipped = [o for o in outs if not torch.equal(o["label"], label)]
    assert flipped and all(torch.equal(o["label"], label.flip(-1)) for o in flipped)
    source = OneImage(label)[0]["image"]
    assert all(torch.equal(o["image"], source.flip(-1)) for o in flipped)


def test_random_scale_then_crop_gives_fixed_size():
    label = torch.randint(0, 5, (40, 60))
    view = Augment(OneImage(label), flip=False, crop=(32, 32), scale=(0.7, 1.3))
    torch.manual_seed(2)
    shapes = {tuple(view[0]["label"].shape) for _ in range(10)}
    assert shapes == {(32, 32)}
    assert set(view[0]["label"].unique().tolist()) <= set(range(5)) | {255}
