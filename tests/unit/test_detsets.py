"""Detection loaders against what the layout writers put on disk, and every bad-input rule."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from det_layouts import (
    CITYSCAPES_IMAGES,
    KITTI_IMAGES,
    SIZE,
    Obj,
    write_cityscapes_boxes,
    write_clipart,
    write_kitti,
    write_sim10k,
    write_voc,
    write_voc_layout,
)

from selftrain.data import detsets
from selftrain.data.detsets import (
    CITYSCAPES_CLASSES,
    DET_DATASETS,
    INOUE6_CLASSES,
    VOC_CLASSES,
    build_det_dataset,
)
from selftrain.errors import ConfigError, DataError

NAMES = ["cityscapes_boxes", "clipart", "coco", "comic", "foggy_cityscapes_boxes", "kitti", "sim10k", "synth_shapes",
         "synth_shapes_fog", "voc", "watercolor"]


def _build(name, root, split, class_names=None, with_labels=True, **options):
    return build_det_dataset(name, root=str(root), split=split, options=options, class_names=class_names,
                             with_labels=with_labels)


def _expected(objects: list[Obj], class_names, keep_difficult=True):
    """(boxes [M, 4], labels [M], difficult [M]) a loader must return for the written objects."""
    kept = [o for o in objects if o.name in class_names and not o.deleted and (keep_difficult or not o.difficult)]
    return (np.array([o.box for o in kept], np.float32).reshape(-1, 4),
            np.array([class_names.index(o.name) + 1 for o in kept], np.int64), np.array([o.difficult for o in kept]))


def _check_sample(sample, objects, class_names, size, keep_difficult=True):
    image = sample["image"]
    assert image.dtype == torch.float32 and tuple(image.shape) == (3, *size)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0 and float(image.max()) > 0.5  # not normalised
    boxes, labels, difficult = _expected(objects, list(class_names), keep_difficult)
    assert sample["boxes"].dtype == torch.float32 and sample["boxes"].shape == (len(boxes), 4)
    assert sample["labels"].dtype == torch.int64 and sample["difficult"].dtype == torch.bool
    np.testing.assert_array_equal(sample["boxes"].numpy(), boxes)
    np.testing.assert_array_equal(sample["labels"].numpy(), labels)
    np.testing.assert_array_equal(sample["difficult"].numpy(), difficult)


def test_registry_lists_every_data_set_and_rejects_unknown_names(tmp_path):
    assert set(NAMES) == set(DET_DATASETS.names())  # a new data set is added here and in tests/contract
    with pytest.raises(ConfigError, match="choose one of: cityscapes_boxes"):
        build_det_dataset("pascal", root=None, split="x", options={})


# --------------------------------------------------------------------------- VOC family

def test_voc_converts_one_based_inclusive_boxes_and_keeps_difficult_and_empty_images(tmp_path):
    written = write_voc(tmp_path / "VOCdevkit")
    xml = (tmp_path / "VOCdevkit/VOC2007/Annotations/000001.xml").read_text()
    assert "<xmin>3</xmin><ymin>4</ymin><xmax>12</xmax><ymax>20</ymax>" in xml  # the file is 1-based
    ds = _build("voc", tmp_path / "VOCdevkit", "trainval")
    assert ds.ids == ["000001", "000002", "000003"] and ds.class_names == VOC_CLASSES
    for i, image_id in enumerate(ds.ids):
        sample = ds[i]
        assert sample["id"] == image_id
        _check_sample(sample, written[image_id], VOC_CLASSES, SIZE)
    assert ds[0]["boxes"][0].tolist() == [2.0, 3.0, 12.0, 20.0] and ds[0]["difficult"].tolist() == [False, True]
    assert ds[1]["boxes"].shape == (0, 4)


def test_voc_root_may_be_the_year_folder_and_years_join_with_prefixed_ids(tmp_path):
    write_voc(tmp_path / "devkit", year=2007)
    write_voc(tmp_path / "devkit", year=2012, images={"2008_000002": [Obj("cat", (1, 1, 5, 5))]})
    assert _build("voc", tmp_path / "devkit" / "VOC2007", "trainval").ids == ["000001", "000002", "000003"]
    assert _build("voc", tmp_path / "devkit", "trainval", year=2012).ids == ["2008_000002"]
    both = _build("voc", tmp_path / "devkit", "trainval", years=[2007, 2012])
    assert both.ids == ["VOC2007/000001", "VOC2007/000002", "VOC2007/000003", "VOC2012/2008_000002"]
    assert both[3]["labels"].tolist() == [VOC_CLASSES.index("cat") + 1]
    with pytest.raises(DataError, match="years are 2007 or 2012"):
        _build("voc", tmp_path / "devkit", "trainval", years=[2007, 2010])


def test_keep_difficult_false_drops_difficult_objects(tmp_path):
    written = write_voc(tmp_path)
    ds = _build("voc", tmp_path, "trainval", keep_difficult=False)
    _check_sample(ds[0], written["000001"], VOC_CLASSES, SIZE, keep_difficult=False)
    assert ds[0]["labels"].tolist() == [VOC_CLASSES.index("person") + 1]


def test_a_class_subset_renumbers_labels_and_skips_the_other_known_classes(tmp_path):
    """VOC -> Watercolor: 6 of the 20 classes; cow and car... are skipped, not errors."""
    written = write_voc(tmp_path)
    ds = _build("voc", tmp_path, "trainval", class_names=INOUE6_CLASSES)
    assert ds.class_names == INOUE6_CLASSES
    for i, image_id in enumerate(ds.ids):
        _check_sample(ds[i], written[image_id], INOUE6_CLASSES, SIZE)
    assert ds[2]["labels"].tolist() == [5, 1]  # dog, bicycle; the cow is gone


@pytest.mark.parametrize("name, classes", [("clipart", VOC_CLASSES), ("watercolor", INOUE6_CLASSES),
                                           ("comic", INOUE6_CLASSES)])
def test_inoue_sets_read_their_voc_layout(tmp_path, name, classes):
    written = write_clipart(tmp_path, split="test")
    ds = _build(name, tmp_path, "test")
    assert ds.class_names == classes and ds.ids == list(written)
    for i, image_id in enumerate(ds.ids):
        _check_sample(ds[i], written[image_id], classes, SIZE)


def test_unknown_class_in_a_full_class_list_set_names_class_and_file(tmp_path):
    write_voc(tmp_path, images={"a": [Obj("persn", (1, 1, 5, 5))]})
    for class_names in (None, INOUE6_CLASSES):  # a subset only skips classes the data set knows
        ds = _build("voc", tmp_path, "trainval", class_names=class_names)
        with pytest.raises(DataError, match=r"unknown class 'persn' in .*a\.xml"):
            ds[0]
    write_clipart(tmp_path / "wc", images={"b": [Obj("bottle", (1, 1, 5, 5))]})
    with pytest.raises(DataError, match="unknown class 'bottle'"):
        _build("watercolor", tmp_path / "wc", "train").ground_truth(0)
    assert _build("clipart", tmp_path / "wc", "train")[0]["labels"].tolist() == [VOC_CLASSES.index("bottle") + 1]


def test_sim10k_keeps_cars_and_reads_every_image_without_lists(tmp_path):
    written = write_sim10k(tmp_path / "a", split="trainval")
    ds = _build("sim10k", tmp_path / "a", "trainval")
    assert ds.class_names == ("car",)
    for i, image_id in enumerate(ds.ids):
        _check_sample(ds[i], written[image_id], ("car",), SIZE)
    assert [len(ds[i]["boxes"]) for i in range(3)] == [1, 0, 2]
    write_sim10k(tmp_path / "b", split=None)
    assert _build("sim10k", tmp_path / "b", "trainval").ids == sorted(written)


def test_list_file_subsets_in_its_order_and_rejects_missing_ids(tmp_path):
    write_voc(tmp_path)
    (tmp_path / "ids.txt").write_text("000003\n\n000001\n")
    ds = _build("voc", tmp_path, "trainval", list_file=str(tmp_path / "ids.txt"))
    assert ds.ids == ["000003", "000001"] and ds[1]["id"] == "000001" and len(ds[1]["boxes"]) == 2
    (tmp_path / "bad.txt").write_text("000003\n999999\n")
    with pytest.raises(DataError, match="999999"):
        _build("voc", tmp_path, "trainval", list_file=str(tmp_path / "bad.txt"))
    (tmp_path / "twice.txt").write_text("000003\n000001\n000003\n")
    with pytest.raises(DataError, match="names image '000003' twice"):
        _build("voc", tmp_path, "trainval", list_file=str(tmp_path / "twice.txt"))


def test_ground_truth_reads_annotations_without_decoding_images(tmp_path, monkeypatch):
    written = write_voc(tmp_path)
    ds = _build("voc", tmp_path, "trainval", with_labels=False)
    sample = ds[0]
    assert sample["boxes"].shape == (0, 4) and sample["labels"].shape == (0,)  # no labels in the sample
    monkeypatch.setattr(detsets, "read_image", lambda *a, **k: pytest.fail("ground_truth decoded an image"))
    gt = ds.ground_truth(0)
    assert sorted(gt) == ["boxes", "difficult", "labels"]
    np.testing.assert_array_equal(gt["boxes"].numpy(), _expected(written["000001"], list(VOC_CLASSES))[0])
    gt["boxes"] += 100  # callers may modify what they get
    assert ds.ground_truth(0)["boxes"].max() < 100


# --------------------------------------------------------------------------- KITTI and Cityscapes

def test_kitti_keeps_cars_by_default_and_maps_types_on_request(tmp_path):
    write_kitti(tmp_path)
    ds = _build("kitti", tmp_path, "training")
    assert ds.class_names == ("car",) and ds.ids == ["000000", "000001", "000002"]
    _check_sample(ds[0], [Obj("car", KITTI_IMAGES["000000"][0].box)], ("car",), (30, 60))
    assert len(ds[1]["boxes"]) == 0 and len(ds[2]["boxes"]) == 0  # DontCare only; empty file
    merged = _build("kitti", tmp_path, "train", type_map={"Car": "car", "Van": "car", "Pedestrian": "person"})
    assert merged.class_names == ("car", "person")
    assert merged[0]["labels"].tolist() == [1, 1, 2]
    assert merged[0]["boxes"][1].tolist() == [32.0, 4.0, 50.0, 22.0]


@pytest.mark.parametrize("name", ["cityscapes_boxes", "foggy_cityscapes_boxes"])
def test_cityscapes_boxes_are_the_tightest_rectangles_of_instance_polygons(tmp_path, name):
    written = write_cityscapes_boxes(tmp_path, foggy=True)
    ds = _build(name, tmp_path, "train")
    assert ds.class_names == CITYSCAPES_CLASSES and ds.ids == sorted(CITYSCAPES_IMAGES)
    if name.startswith("foggy"):
        assert ds.items[0].image.name.endswith("_leftImg8bit_foggy_beta_0.02.png")
    for i, image_id in enumerate(ds.ids):  # road, sky, cargroup and the deleted bicycle are skipped
        _check_sample(ds[i], written[image_id], CITYSCAPES_CLASSES, (32, 64))
    assert ds[0]["boxes"][0].tolist() == [10.0, 10.0, 30.0, 22.0]  # car polygon (10,12) (25,10) (30,18) (12,22)
    assert ds[0]["labels"].tolist() == [3, 1, 2]


def test_foggy_beta_must_be_released_and_present(tmp_path):
    write_cityscapes_boxes(tmp_path, foggy=True, betas=(0.02,))
    with pytest.raises(DataError, match="choose one of: 0.005, 0.01, 0.02"):
        _build("foggy_cityscapes_boxes", tmp_path, "train", beta=0.03)
    with pytest.raises(DataError, match="no images"):
        _build("foggy_cityscapes_boxes", tmp_path, "train", beta=0.01)
    assert len(_build("cityscapes_boxes", tmp_path, "train", class_names=["car"])[0]["boxes"]) == 1


# --------------------------------------------------------------------------- bad input

def test_malformed_annotations_name_their_file(tmp_path):
    write_voc(tmp_path / "voc")
    (tmp_path / "voc/VOC2007/Annotations/000003.xml").write_text("<annotation><object><name>dog</name>")
    with pytest.raises(DataError, match=r"000003\.xml"):
        _build("voc", tmp_path / "voc", "trainval")[2]
    write_voc(tmp_path / "voc2", images={"x": [Obj("dog", (1, 1, 5, 5))]})
    path = tmp_path / "voc2/VOC2007/Annotations/x.xml"
    path.write_text(path.read_text().replace("<xmax>5</xmax>", "<xmax>five</xmax>"))
    with pytest.raises(DataError, match=r"x\.xml"):
        _build("voc", tmp_path / "voc2", "trainval").ground_truth(0)
    write_kitti(tmp_path / "kitti", images={"000000": []})
    (tmp_path / "kitti/training/label_2/000000.txt").write_text("Car 0 0 0 1 2\n")
    with pytest.raises(DataError, match=r"000000\.txt line 1 "):
        _build("kitti", tmp_path / "kitti", "training")[0]
    write_cityscapes_boxes(tmp_path / "cs", foggy=False)
    (tmp_path / "cs/gtFine/train/aachen/aachen_000000_000019_gtFine_polygons.json").write_text("{not json")
    with pytest.raises(DataError, match=r"gtFine_polygons\.json"):
        _build("cityscapes_boxes", tmp_path / "cs", "train")[0]


def test_boxes_outside_the_image_are_clipped_and_empty_ones_dropped_with_warnings(tmp_path, caplog):
    write_voc(tmp_path, images={"a": [Obj("dog", (-4, 2, 40, 20)), Obj("cat", (3, 3, 3, 9)),
                                      Obj("cow", (35, 2, 50, 9)), Obj("car", (1, 1, 4, 4))]})
    with caplog.at_level(logging.WARNING, logger="selftrain.data.detsets"):
        sample = _build("voc", tmp_path, "trainval")[0]
    assert sample["boxes"].tolist() == [[0.0, 2.0, 32.0, 20.0], [1.0, 1.0, 4.0, 4.0]]
    assert sample["labels"].tolist() == [VOC_CLASSES.index("dog") + 1, VOC_CLASSES.index("car") + 1]
    text = caplog.text
    assert "clipped 2 box(es)" in text and "dropped 2 box(es) of zero area" in text and "a.xml" in text


def test_missing_paths_splits_and_options_are_actionable(tmp_path):
    with pytest.raises(DataError, match=f"data path {tmp_path / 'nope'} does not exist"):
        _build("voc", tmp_path / "nope", "trainval")
    write_voc(tmp_path)
    with pytest.raises(DataError, match="choose one of: trainval"):
        _build("voc", tmp_path, "val")
    valid = "valid options: class_names, keep_difficult, list_file, with_labels, year, years"
    with pytest.raises(DataError, match=valid):
        _build("voc", tmp_path, "trainval", yeer=2012)
    with pytest.raises(DataError, match="needs a root"):
        build_det_dataset("kitti", root=None, split="training", options={})
    with pytest.raises(DataError, match="kitti split 'val' is unknown"):
        _build("kitti", tmp_path, "val")


def test_missing_annotations_corrupt_images_and_size_mismatches_are_data_errors(tmp_path):
    write_voc(tmp_path)
    (tmp_path / "VOC2007/Annotations/000002.xml").unlink()
    with pytest.raises(DataError, match=r"1 images have no annotation \(first: .*000002\.xml\)"):
        _build("voc", tmp_path, "trainval")
    assert len(_build("voc", tmp_path, "trainval", with_labels=False)) == 3
    (tmp_path / "VOC2007/JPEGImages/000001.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"cannot read image .*000001\.jpg"):
        _build("voc", tmp_path, "trainval", with_labels=False)[0]
    write_voc_layout(tmp_path / "b", {"x": [Obj("dog", (1, 1, 5, 5))]}, split="s", size=(20, 20))
    (tmp_path / "b/Annotations/x.xml").write_text((tmp_path / "b/Annotations/x.xml").read_text()
                                                  .replace("<width>20</width>", "<width>40</width>"))
    with pytest.raises(DataError, match="is 20x20 but .* says 40x20"):
        _build("voc", tmp_path / "b", "s")[0]


def test_samples_train_a_torchvision_detector_including_an_empty_image(tmp_path):
    """The format reaches torchvision's Faster R-CNN losses as is (a tiny one; empty images included)."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    write_voc(tmp_path)
    ds = _build("voc", tmp_path, "trainval")
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4, padding=1), torch.nn.ReLU())
    backbone.out_channels = 8
    model = FasterRCNN(backbone, num_classes=len(VOC_CLASSES) + 1, min_size=32, max_size=64,
                       rpn_anchor_generator=AnchorGenerator(sizes=((8, 16),), aspect_ratios=((0.5, 1.0, 2.0),)),
                       box_roi_pool=MultiScaleRoIAlign(["0"], 3, 2)).train()
    samples = [ds[0], ds[1]]
    losses = model([s["image"] for s in samples], [{"boxes": s["boxes"], "labels": s["labels"]} for s in samples])
    assert all(torch.isfinite(v) for v in losses.values())
