"""Named backbone taps and RoI records of the detection adapters, for alignment loss terms.

Adaptive detectors align features below the last map: SWDA and HTCN (Chen et al., CVPR 2020,
arXiv:2003.06297) at VGG-16 relu3_2 / relu4_2 / relu5_3, iFAN (Zhuang et al., AAAI 2020,
arXiv:2003.04132) at pool2 / pool3 / pool4 / relu5_3, and their instance terms read the RoIs of
each image. A term asks for what it reads at attach time (``request_taps``, ``request_rois``); the
adapter then records it in ``forward_train`` and nothing else, so a run without such a term pays
nothing.

A tap is only useful if the layers at and below it train: iFAN's pool2 discriminator aligns
nothing when conv1 and conv2 are frozen, as py-faster-rcnn and torchvision freeze them with
ImageNet weights. Requesting such a tap is an error that names the frozen layers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from selftrain.errors import ConfigError
from selftrain.types import Tap, TapError

UNLABELLED_MODES = ("random", "top")


def params_up_to(root: nn.Module, path: str) -> list[tuple[str, nn.Parameter]]:
    """The parameters of ``root`` registered before the end of its submodule ``path`` (the module
    included). In the sequential backbones here registration order is forward order, so these are
    the parameters at and below the tap."""
    out: list[tuple[str, nn.Parameter]] = []
    inside = False
    for name, module in root.named_modules():
        if inside and not name.startswith(path + "."):
            break
        inside = inside or name == path
        out += [(f"{name}.{k}", p) for k, p in module.named_parameters(recurse=False)]
    if not inside:
        raise KeyError(f"no submodule {path!r}")
    return out


def frozen_layers(root: nn.Module, path: str) -> list[str]:
    """The modules at or below ``path`` with a parameter that does not train, in forward order."""
    names = [n.rsplit(".", 1)[0] for n, p in params_up_to(root, path) if not p.requires_grad]
    return list(dict.fromkeys(names))


class TapTable:
    """What one adapter offers: taps (name -> :class:`Tap` and the module path inside ``root``) and
    the requests the loss terms made.

    ``model``: the adapter's name for messages; ``unfreeze``: how a user makes frozen layers train.
    """

    def __init__(self, root: nn.Module, taps: Iterable[tuple[Tap, str]], *, model: str,
                 unfreeze: str = "") -> None:
        self.root, self.model, self.unfreeze = root, model, unfreeze
        self.taps = {tap.name: (tap, path) for tap, path in taps}
        self.requested: dict[str, Tap] = {}

    def declared(self) -> dict[str, Tap]:
        return {name: tap for name, (tap, _) in self.taps.items()}

    def request(self, names: Iterable[str]) -> dict[str, Tap]:
        """Record the named taps for every later ``forward_train``; unknown or frozen ones raise TapError."""
        names = list(names)
        for name in names:
            self._check(name)
        self.requested.update({n: self.taps[n][0] for n in names})
        return {n: self.taps[n][0] for n in names}

    def _check(self, name: str) -> None:
        if name not in self.taps:
            valid = ", ".join(self.taps) or "none"
            raise TapError(f"{self.model} has no feature tap {name!r}; its taps: {valid}")
        frozen = frozen_layers(self.root, self.taps[name][1])
        if frozen:
            raise TapError(f"tap {name!r} of {self.model} cannot align anything: layers at or below it are frozen "
                           f"({', '.join(frozen)}); {self.unfreeze or 'make them trainable'}")

    def modules(self) -> dict[str, nn.Module]:
        """The modules whose outputs ``forward_train`` records: the requested taps only."""
        return {name: self.root.get_submodule(self.taps[name][1]) for name in self.requested}


def unlabelled_option(value: Any) -> dict[str, Any] | None:
    """``model.options.unlabelled_rois`` checked: None (pool every proposal) or {n: int >= 1, mode}."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or set(value) - {"n", "mode"} or "n" not in value:
        raise ConfigError(f"model.options.unlabelled_rois must be {{n: int, mode: random|top}}, got {value!r}")
    n, mode = value["n"], value.get("mode", "random")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"model.options.unlabelled_rois.n must be an integer >= 1, got {n!r}")
    if mode not in UNLABELLED_MODES:
        raise ConfigError(f"model.options.unlabelled_rois.mode must be one of {', '.join(UNLABELLED_MODES)}, "
                          f"got {mode!r}")
    return {"n": n, "mode": mode}


def sample_unlabelled(proposals: list[Tensor], scores: list[Tensor], option: dict[str, Any] | None
                      ) -> tuple[list[Tensor], list[Tensor]]:
    """The RoIs of images without labels, chosen from their proposals alone (never from boxes).

    ``random``: n indices drawn uniformly *with replacement* (HTCN's released code,
    chaoqichen/HTCN@0092e29: 256 target RoIs from the 2000 proposals); ``top``: the n proposals of
    highest objectness (SCDA), all of them when there are fewer. None keeps every proposal.

    Shape: proposals, scores: one [P_i, 4] / [P_i] per image -> one [n_i, 4] / [n_i] per image.
    """
    if option is None:
        return proposals, scores
    out_boxes, out_scores = [], []
    for boxes, score in zip(proposals, scores):
        if option["mode"] == "random" and len(boxes):
            keep = torch.randint(len(boxes), (option["n"],), device=boxes.device)
        else:  # filter_proposals returns each image's proposals highest objectness first
            keep = score.argsort(descending=True, stable=True)[: option["n"]]
        out_boxes.append(boxes[keep])
        out_scores.append(score[keep])
    return out_boxes, out_scores


def sample_labelled(roi_heads: Any, proposals: list[Tensor], scores: list[Tensor], targets: list[dict[str, Tensor]]):
    """torchvision's ``RoIHeads.select_training_samples`` step by step (the same random draws), keeping
    each RoI's RPN objectness (1.0 for the ground-truth boxes the sampler adds to the proposals).

    Returns per image: RoI boxes [R_i, 4], objectness [R_i], labels [R_i], and the regression targets
    [R_i, 4]; labels 0 are sampled negatives.
    """
    rh = roi_heads
    gt_boxes = [t["boxes"].to(proposals[0].dtype) for t in targets]
    proposals = rh.add_gt_proposals(proposals, gt_boxes)
    scores = [torch.cat([s, s.new_ones(len(g))]) for s, g in zip(scores, gt_boxes)]
    matched, labels = rh.assign_targets_to_proposals(proposals, gt_boxes, [t["labels"] for t in targets])
    sampled = rh.subsample(labels)
    boxes, objectness, kept_labels, matched_boxes = [], [], [], []
    for i, keep in enumerate(sampled):
        boxes.append(proposals[i][keep])
        objectness.append(scores[i][keep])
        kept_labels.append(labels[i][keep])
        gt = gt_boxes[i] if gt_boxes[i].numel() else gt_boxes[i].new_zeros((1, 4))
        matched_boxes.append(gt[matched[i][keep]])
    return boxes, objectness, kept_labels, rh.box_coder.encode(matched_boxes, boxes)


def refined_boxes(box_coder: Any, regression: Tensor, logits: Tensor, boxes: list[Tensor],
                  sizes: list[tuple[int, int]]) -> Tensor:
    """Per RoI the box of its argmax foreground class, decoded and clipped, detached. [R, 4]."""
    from torchvision.ops import clip_boxes_to_image

    with torch.no_grad():
        decoded = box_coder.decode(regression, boxes)  # [R, K + 1, 4]
        best = logits[:, 1:].argmax(1) + 1
        chosen = decoded[torch.arange(len(best), device=best.device), best]
        parts = chosen.split([len(b) for b in boxes])
        return torch.cat([clip_boxes_to_image(p, s) for p, s in zip(parts, sizes)]) if parts else chosen


def unnormalised(batch: Any, transform: Any) -> Tensor:
    """The resized, padded input batch before normalisation, in [0, 1], padding 0. [B, 3, H, W]."""
    x = batch.tensors.detach()
    mean = torch.as_tensor(transform.image_mean, dtype=x.dtype, device=x.device)[:, None, None]
    std = torch.as_tensor(transform.image_std, dtype=x.dtype, device=x.device)[:, None, None]
    out = x * std + mean
    for i, (h, w) in enumerate(batch.image_sizes):
        out[i, :, h:, :] = 0
        out[i, :, :, w:] = 0
    return out
