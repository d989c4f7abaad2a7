"""Every registered data set, segmentation and detection, through the builders that runs use: the
sample each returns, its ids, its ground truth and its unlabelled variant, on a tiny copy written in
its real layout. Each registry must equal the fixtures here: a new data set needs one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from det_layouts import (write_cityscapes_boxes, write_clipart, write_coco, write_kitti, write_sim10k,
                         write_voc)
from layouts import write_bdd100k, write_cityscapes, write_gta5, write_nthu, write_synthia

from selftrain.data.datasets import DATASETS, build_dataset
from selftrain.data.detsets import DET_DATASETS, build_det_dataset
from selftrain.data.synth import write_benchmark


@dataclass
class Spec:
    """How to build one data set on ``tmp``: root, split, options, and the ids it must list."""

    root: Path | None
    split: str
    options: dict[str, Any] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)
    num_classes: int = 19


def _folder(tmp: Path) -> Spec:
    write_benchmark(tmp / "synth", num_source=0, num_target_train=0, num_target_val=2, height=32, width=64)
    return Spec(tmp / "synth", "target_val", ids=["target_val_00000", "target_val_00001"], num_classes=10)


def _cityscapes(tmp: Path, name: str, options: dict[str, Any] | None = None) -> Spec:
    written = write_cityscapes(tmp / name, splits={"val": 2}, foggy=name.startswith("foggy"))
    return Spec(written.root, "val", options or {}, written.ids["val"])


SEGMENTATION: dict[str, Callable[[Path], Spec]] = {
    "synth_street": lambda tmp: Spec(None, "target_val", {"num_images": 2, "height": 32, "width": 64},
                                     ["target_val_00000", "target_val_00001"], 10),
    "folder": _folder,
    "cityscapes": lambda tmp: _cityscapes(tmp, "cityscapes"),
    "foggy_cityscapes": lambda tmp: _cityscapes(tmp, "foggy_cityscapes", {"beta": 0.01}),
    "gta5": lambda tmp: (lambda w: Spec(w.root, "", ids=w.ids[""]))(write_gta5(tmp / "gta5", n=3)),
    "synthia": lambda tmp: (lambda w: Spec(w.root, "", ids=w.ids[""], num_classes=16))(write_synthia(tmp / "s")),
    "nthu": lambda tmp: (lambda w: Spec(w.root, "test", {"city": "Rome"}, w.ids["test"], 13))(write_nthu(tmp / "n")),
    "bdd100k": lambda tmp: (lambda w: Spec(w.root, "val", ids=w.ids["val"]))(write_bdd100k(tmp / "bdd")),
}


def _voc_like(writer: Callable[..., dict], split: str) -> Callable[[Path], Spec]:
    return lambda tmp: Spec(tmp / "d", split, ids=list(writer(tmp / "d", split=split)))


DETECTION: dict[str, Callable[[Path], Spec]] = {
    "synth_shapes": lambda tmp: Spec(None, "target_val", {"num_images": 2, "height": 64, "width": 64},
                                     ["target_val_00000", "target_val_00001"]),
    "synth_shapes_fog": lambda tmp: Spec(None, "target_train", {"num_images": 2, "height": 64, "width": 64,
                                                                "same_scenes": True},
                                         ["target_train_00000", "target_train_00001"]),
    "voc": lambda tmp: Spec(tmp / "VOCdevkit", "trainval", ids=list(write_voc(tmp / "VOCdevkit"))),
    "clipart": _voc_like(write_clipart, "train"),
    "watercolor": _voc_like(write_clipart, "test"),
    "comic": _voc_like(write_clipart, "train"),
    "sim10k": _voc_like(write_sim10k, "trainval"),
    "kitti": lambda tmp: Spec(tmp / "kitti", "training", ids=list(write_kitti(tmp / "kitti"))),
    "cityscapes_boxes": lambda tmp: Spec(tmp / "cs", "val", ids=list(write_cityscapes_boxes(tmp / "cs", split="val",
                                                                                            foggy=False))),
    "foggy_cityscapes_boxes": lambda tmp: Spec(tmp / "cs", "val", {"beta": 0.02},
                                               list(write_cityscapes_boxes(tmp / "cs", split="val"))),
    "coco": lambda tmp: Spec(tmp / "coco", "val", ids=list(write_coco(tmp / "coco", split="val"))),
}


def test_every_registered_data_set_has_a_fixture():
    assert set(SEGMENTATION) == set(DATASETS.names())
    assert set(DETECTION) == set(DET_DATASETS.names())


def _check_common(ds, spec: Spec) -> None:
    assert len(ds) == len(ds.ids) > 0 and all(isinstance(i, str) and i for i in ds.ids)
    assert len(set(ds.ids)) == len(ds.ids) and sorted(ds.ids) == sorted(spec.ids)
    for i in range(len(ds)):
        path = ds.image_path(i)
        assert path is None or Path(path).is_file()


@pytest.mark.parametrize("name", sorted(SEGMENTATION))
def test_segmentation_data_set_contract(name, tmp_path):
    spec = SEGMENTATION[name](tmp_path)
    ignore = 250  # not the files' 255: the data set must map it

    def build(with_labels: bool):
        return build_dataset(name, root=None if spec.root is None else str(spec.root), split=spec.split,
                             options=spec.options, num_classes=spec.num_classes, ignore_index=ignore,
                             with_labels=with_labels)

    ds, bare = build(True), build(False)
    _check_common(ds, spec)
    assert bare.ids == ds.ids
    names = getattr(ds, "class_names", None)
    assert names is None or len(names) == spec.num_classes
    for i in range(len(ds)):
        sample, unlabelled = ds[i], bare[i]
        image, label = sample["image"], sample["label"]
        assert sample["id"] == ds.ids[i] == unlabelled["id"]
        assert image.dtype == torch.float32 and image.dim() == 3 and image.shape[0] == 3
        assert label.dtype == torch.int64 and label.shape == image.shape[1:]
        values = set(label.unique().tolist())
        assert values <= set(range(spec.num_classes)) | {ignore} and values - {ignore}
        assert torch.equal(unlabelled["image"], image) and bool((unlabelled["label"] == ignore).all())
        truth = ds.ground_truth(i)
        if truth is not None:  # reporting reads it without the image
            np.testing.assert_array_equal(np.asarray(truth), label.numpy())


@pytest.mark.parametrize("name", sorted(DETECTION))
def test_detection_data_set_contract(name, tmp_path):
    spec = DETECTION[name](tmp_path)

    def build(with_labels: bool):
        return build_det_dataset(name, root=None if spec.root is None else str(spec.root), split=spec.split,
                                 options=spec.options, with_labels=with_labels)

    ds, bare = build(True), build(False)
    _check_common(ds, spec)
    assert bare.ids == ds.ids
    k = len(ds.class_names)
    assert k > 0 and len(set(ds.class_names)) == k
    objects = 0
    for i in range(len(ds)):
        sample, unlabelled = ds[i], bare[i]
        image, boxes, labels = sample["image"], sample["boxes"], sample["labels"]
        assert sample["id"] == ds.ids[i] == unlabelled["id"]
        assert image.dtype == torch.float32 and image.dim() == 3 and image.shape[0] == 3
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        h, w = image.shape[1:]
        assert boxes.dtype == torch.float32 and boxes.shape == (len(labels), 4)
        assert labels.dtype == torch.int64 and bool(torch.all((labels >= 1) & (labels <= k)))
        assert sample["difficult"].dtype == torch.bool and sample["difficult"].shape == labels.shape
        assert bool(torch.all(boxes[:, 2:] > boxes[:, :2])) and bool(torch.all(boxes >= 0))
        assert bool(torch.all(boxes[:, [0, 2]] <= w)) and bool(torch.all(boxes[:, [1, 3]] <= h))
        truth = ds.ground_truth(i)
        for key in ("boxes", "labels", "difficult"):
            assert torch.equal(truth[key], sample[key]), key
        assert torch.equal(unlabelled["image"], image)
        assert unlabelled["boxes"].shape == (0, 4) and unlabelled["labels"].numel() == 0
        objects += len(labels)
    assert objects > 0
