"""Training-time views of data sets: pseudo-labels attached, flips, crops, rare-class mining."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from ..errors import StoreError


class PseudoLabeled(Dataset):
    """The target data set with each image's label replaced by its stored pseudo-label.

    ``reader`` is a round reader from :func:`selftrain.store.open_round` holding every image of the
    data set; labels are paired with images by id (the file stores them), in whatever order the
    file was written, so a stale file cannot be paired with other images.
    """

    def __init__(self, dataset: Dataset, reader) -> None:
        if len(reader) != len(dataset):
            raise StoreError(f"pseudo-label file holds {len(reader)} images, the target set {len(dataset)}; "
                             "regenerate the round (delete the run directory's pseudo/ files or use a new --out)")
        self.dataset, self.reader = dataset, reader

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.dataset[index])
        try:
            stored = self.reader.index_of(sample["id"])
        except KeyError:
            raise StoreError(f"target image {sample['id']!r} has no pseudo-label in {self.reader.path}; the target "
                             "set changed since the round was labelled: regenerate the round (delete the run "
                             "directory's pseudo/ files or use a new --out)") from None
        sample["label"] = torch.from_numpy(self.reader.labels(stored).astype("int64"))
        return sample


class Augment(Dataset):
    """Random scale, random crop and horizontal flip; with ``mine_classes`` a crop is centred, with
    probability ``mine_probability``, on a pixel of one of those classes (CBST §5 hard-sample mining).

    Crops pad with ``ignore_index`` (labels) and 0 (normalised images) when the image is smaller.
    """

    def __init__(self, dataset: Dataset, *, flip: bool = True, crop: Sequence[int] | None = None,
                 scale: Sequence[float] | None = None, mine_classes: Sequence[int] = (),
                 mine_probability: float = 0.5, ignore_index: int = 255) -> None:
        self.dataset, self.flip, self.crop = dataset, flip, tuple(crop) if crop else None
        self.scale = tuple(scale) if scale else None
        self.mine_classes = torch.as_tensor(list(mine_classes), dtype=torch.int64)
        self.mine_probability, self.ignore_index = mine_probability, ignore_index

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.dataset[index])
        image, label = sample["image"], sample["label"]
        if self.scale is not None:
            image, label = self._rescale(image, label)
        if self.crop is not None:
            image, label = self._crop(image, label)
        if self.flip and torch.rand(()) < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        sample["image"], sample["label"] = image.contiguous(), label.contiguous()
        return sample

    def _rescale(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Random multi-scale resizing (CBST appendix: 0.7-1.3): bilinear image, nearest label."""
        lo, hi = self.scale
        factor = lo + (hi - lo) * float(torch.rand(()))
        size = [max(1, round(s * factor)) for s in label.shape]
        image = torch.nn.functional.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        label = torch.nn.functional.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
        return image, label

    def _crop(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ch, cw = self.crop
        image, label = _pad_to(image, label, ch, cw, self.ignore_index)
        h, w = label.shape
        center = self._mined_center(label)
        if center is None:
            top = int(torch.randint(0, h - ch + 1, ()))
            left = int(torch.randint(0, w - cw + 1, ()))
        else:
            top = min(max(center[0] - ch // 2, 0), h - ch)
            left = min(max(center[1] - cw // 2, 0), w - cw)
        return image[:, top:top + ch, left:left + cw], label[top:top + ch, left:left + cw]

    def _mined_center(self, label: torch.Tensor) -> tuple[int, int] | None:
        if len(self.mine_classes) == 0 or torch.rand(()) >= self.mine_probability:
            return None
        hits = torch.nonzero(torch.isin(label, self.mine_classes))
        if len(hits) == 0:
            return None
        y, x = hits[int(torch.randint(0, len(hits), ()))].tolist()
        return y, x


def _pad_to(image: torch.Tensor, label: torch.Tensor, ch: int, cw: int, ignore_index: int):
    h, w = label.shape
    ph, pw = max(ch - h, 0), max(cw - w, 0)
    if ph == 0 and pw == 0:
        return image, label
    image = torch.nn.functional.pad(image, (0, pw, 0, ph), value=0.0)
    label = torch.nn.functional.pad(label, (0, pw, 0, ph), value=ignore_index)
    return image, label


class DetAugment(Dataset):
    """Detection training views: horizontal flip (p = 0.5) of image [3, H, W] in [0, 1] and xyxy boxes,
    and with ``photometric`` SSD's photometric distortion (Liu et al. 2016): random brightness,
    contrast, saturation and hue (torchvision ColorJitter 0.125 / 0.5 / 0.5 / 0.05)."""

    def __init__(self, dataset: Dataset, *, flip: bool = True, photometric: bool = False) -> None:
        from torchvision.transforms import v2

        self.dataset, self.flip = dataset, flip
        self.jitter = v2.ColorJitter(brightness=0.125, contrast=0.5, saturation=0.5, hue=0.05) if photometric else None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.dataset[index])
        if self.jitter is not None:
            sample["image"] = self.jitter(sample["image"])
        if self.flip and torch.rand(()) < 0.5:
            width = sample["image"].shape[-1]
            sample["image"] = sample["image"].flip(-1).contiguous()
            boxes = sample["boxes"].clone()
            boxes[:, [0, 2]] = width - sample["boxes"][:, [2, 0]]
            sample["boxes"] = boxes
        return sample


def photometric(images: torch.Tensor, *, normalised: bool) -> torch.Tensor:
    """A strong photometric view for mean-teacher students; geometry (labels, boxes) is unchanged.

    Per image: contrast x0.6-1.4, brightness +-0.2, colour gain x0.8-1.2 per channel, Gaussian noise
    0.03 (in [0, 1] units; ImageNet-normalised inputs are scaled by their std 0.226).
    Shape: [3, H, W] or [B, 3, H, W] -> same.
    """
    unit = 1 / 0.226 if normalised else 1.0
    x = images if images.dim() == 4 else images[None]
    b = x.shape[0]
    shape = (b, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = torch.empty(shape, device=x.device).uniform_(0.6, 1.4)
    brightness = torch.empty(shape, device=x.device).uniform_(-0.2, 0.2) * unit
    gain = torch.empty((b, 3, 1, 1), device=x.device).uniform_(0.8, 1.2)
    out = ((x - mean) * contrast + mean) * gain + brightness + 0.03 * unit * torch.randn_like(x)
    if not normalised:
        out = out.clamp(0.0, 1.0)
    return out if images.dim() == 4 else out[0]
