"""The pure parts of `selftrain labels export`: VOC's pixel convention, names, the export folder, the COCO reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from selftrain.data.coco import CocoDetection
from selftrain.data.detsets import read_voc_xml
from selftrain.errors import DataError, UserError
from selftrain.export import (MANIFEST, check_destination, check_options, cityscapes_name, coco_annotations,
                              flat_names, staged_folder, voc_pixels, voc_xml)


@pytest.mark.parametrize("box, expected", [
    ((0, 0, 32, 24), (1, 1, 32, 24)),             # the whole 32x24 image: VOC's 1..W, 1..H
    ((2, 3, 12, 20), (3, 4, 12, 20)),             # whole pixels: xmin = x0 + 1, xmax = x1
    ((0.4, 2.5, 9.5, 12.49), (1, 4, 10, 12)),     # edges to the nearest boundary, halves up
    ((-3.0, -0.2, 40.0, 30.0), (1, 1, 32, 24)),   # clipped to the image
    ((5.2, 7.1, 5.4, 7.3), (6, 8, 6, 8)),         # thinner than half a pixel: one pixel kept
    ((31.8, 23.9, 32.0, 24.0), (32, 24, 32, 24)),  # at the far corner: the last pixel
])
def test_voc_pixels_follow_the_devkit_convention(box, expected):
    assert voc_pixels(np.array([box], np.float32), (24, 32)).tolist() == [list(expected)]


def test_voc_pixels_of_no_boxes():
    assert voc_pixels(np.zeros((0, 4), np.float32), (24, 32)).shape == (0, 4)


def _found(boxes, labels, scores, srrs=None):
    n = len(labels)
    return {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "labels": np.asarray(labels, np.int64),
            "scores": np.asarray(scores, np.float32),
            "srrs": np.asarray(srrs if srrs is not None else [np.nan] * n, np.float32)}


def test_voc_xml_reads_back_through_the_loader_as_rounded_boxes(tmp_path):
    found = _found([(0.4, 2.5, 9.5, 12.49), (0, 0, 32, 24)], [2, 1], [0.9, 0.123456789], [np.nan, 0.5])
    text = voc_xml(folder="out", filename="a.jpg", source={"database": "d"}, size=(24, 32), found=found,
                   class_names=["car", "person"])
    (tmp_path / "a.xml").write_text(text)
    raw = read_voc_xml(tmp_path / "a.xml")
    assert raw.names == ["person", "car"] and raw.size == (24, 32) and not raw.difficult.any()
    assert raw.boxes.tolist() == [[0, 3, 10, 12], [0, 0, 32, 24]]
    import xml.etree.ElementTree as ET

    objects = ET.fromstring(text).findall("object")
    assert [np.float32(o.findtext("score")) for o in objects] == [np.float32(0.9), np.float32(0.123456789)]
    assert objects[0].find("srrs") is None and float(objects[1].findtext("srrs")) == 0.5
    assert [child.tag for child in objects[0]] == ["name", "pose", "truncated", "difficult", "bndbox", "score"]


def test_coco_bbox_gives_the_stored_right_edge_back():
    boxes = np.random.default_rng(0).uniform(0, 1000, (200, 4)).astype(np.float32)
    boxes[:, 2:] = boxes[:, :2] + np.random.default_rng(1).uniform(1e-3, 300, (200, 2)).astype(np.float32)
    records = coco_annotations(_found(boxes, [1] * 200, [0.5] * 200), image=3, first_id=7)
    back = np.array([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in records)]).astype(np.float32)
    assert np.array_equal(back, boxes)
    assert [r["id"] for r in records[:2]] == [7, 8] and records[0]["image_id"] == 3 and "srrs" not in records[0]


def test_names_in_flat_and_cityscapes_layouts():
    assert flat_names(["VOC2007/000005", "000007"]) == ["VOC2007_000005", "000007"]
    with pytest.raises(UserError, match="'a/b' and 'a_b' would both be written as a_b"):
        flat_names(["a/b", "a_b"])
    assert cityscapes_name("aachen/aachen_000000_000019", "x") == ("aachen", "aachen_000000_000019")
    assert cityscapes_name("target_train_00004", "synth_street") == ("synth_street", "target_train_00004")


@pytest.mark.parametrize("args, message", [
    (("yolo", "link", "train"), "--format 'yolo' is unknown; use png or cityscapes (segmentation), voc or coco"),
    (("voc", "hard", "train"), "--images 'hard' is unknown; use one of: link, copy, none"),
    (("voc", "link", "../x"), "--split '../x' is not a plain name"),
])
def test_options_are_checked(args, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_options(*args)


def test_a_folder_with_other_files_is_never_written_into(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="holds files that are not a selftrain export"):
            check_destination(tmp_path / "data", overwrite=overwrite)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        check_destination(tmp_path / "file", overwrite=True)
    check_destination(tmp_path / "new", overwrite=False)
    (tmp_path / "empty").mkdir()
    check_destination(tmp_path / "empty", overwrite=False)


def test_an_earlier_export_is_replaced_only_with_overwrite(tmp_path):
    out = tmp_path / "out"
    with staged_folder(out) as staging:
        (staging / "a.txt").write_text("first")
        (staging / MANIFEST).write_text(json.dumps({"export": "voc", "round": 1}))
    with pytest.raises(UserError, match=r"holds an earlier export \(voc of round 1\); pass --overwrite"):
        check_destination(out, overwrite=False)
    check_destination(out, overwrite=True)
    with staged_folder(out) as staging:
        (staging / "b.txt").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_export_leaves_the_folder_as_it_was(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST).write_text("{}")
    with pytest.raises(RuntimeError):
        with staged_folder(out) as staging:
            (staging / "half.txt").write_text("x")
            raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / MANIFEST).read_text() == "{}"
    with pytest.raises(UserError, match="cannot create the export folder"):
        with staged_folder(out / MANIFEST / "sub"):
            pass


# --------------------------------------------------------------------------- the coco data set
def _coco_files(tmp_path: Path, doc: dict) -> Path:
    from PIL import Image

    for image in doc["images"]:
        path = tmp_path / "train" / image["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (image["width"], image["height"])).save(path)
    (tmp_path / "annotations").mkdir(exist_ok=True)
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps(doc))
    return tmp_path


COCO_DOC = {
    "images": [{"id": 10, "file_name": "a/one.jpg", "height": 20, "width": 30},
               {"id": 11, "file_name": "two.png", "height": 20, "width": 30}],
    "annotations": [{"id": 1, "image_id": 10, "category_id": 7, "bbox": [1.5, 2.0, 10.25, 5.0], "iscrowd": 0},
                    {"id": 2, "image_id": 10, "category_id": 3, "bbox": [0, 0, 30, 20], "iscrowd": 1},
                    {"id": 3, "image_id": 10, "category_id": 5, "bbox": [4, 4, 2, 2], "iscrowd": 0}],
    "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "car"}, {"id": 5, "name": "bird"}],
}


def test_coco_reader_matches_categories_by_name(tmp_path):
    root = _coco_files(tmp_path, COCO_DOC)
    ds = CocoDetection(root=str(root), class_names=["dog", "car"])
    assert ds.ids == ["a/one", "two"] and ds.image_path(0) == root / "train" / "a" / "one.jpg"
    gt = ds.ground_truth(0)
    assert gt["boxes"].tolist() == [[1.5, 2.0, 11.75, 7.0], [0, 0, 30, 20]]   # bird is not wanted: skipped
    assert gt["labels"].tolist() == [1, 2] and gt["difficult"].tolist() == [False, True]
    sample = ds[1]
    assert sample["image"].shape == (3, 20, 30) and sample["boxes"].shape == (0, 4)
    assert CocoDetection(root=str(root)).class_names == ("car", "bird", "dog")  # category id order


def test_coco_reader_errors_are_one_line(tmp_path):
    root = _coco_files(tmp_path, COCO_DOC)
    with pytest.raises(DataError, match="COCO annotations .* do not exist; set options.annotations"):
        CocoDetection(root=str(root), split="val")
    with pytest.raises(DataError, match="are not under .*; set options.image_root"):
        CocoDetection(root=str(root), image_root=str(tmp_path / "elsewhere"))
    bad = dict(COCO_DOC, annotations=[{"id": 1, "image_id": 10, "category_id": 99, "bbox": [0, 0, 1, 1]}])
    (root / "annotations" / "instances_bad.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"cannot read COCO annotations .*instances_bad.json \(KeyError: 99\)"):
        CocoDetection(root=str(root), annotations=str(root / "annotations" / "instances_bad.json"),
                      image_root=str(root / "train"))
