"""Damaged, edited and foreign round files: the reader refuses each with one StoreError line.

Each case starts from a valid file written by PseudoLabelWriter (segmentation or detection), edits
it with plain h5py or by its bytes, and expects a StoreError naming the file and the problem.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest

from selftrain.errors import StoreError
from selftrain.store import PseudoLabelWriter, RoundMeta, open_round, recipe_sha256, written_by

NAMES = ["road", "car", "sky"]
RECIPE = "name: checks\npolicy: {name: cbst, portion: 0.2}\n"


def write_valid(path: Path, task: str) -> Path:
    """Three images of 4x5 pixels (segmentation) or 0-2 boxes each (detection), round 1."""
    rng = np.random.default_rng(0)
    with PseudoLabelWriter(path, RoundMeta(task=task, round=1, policy="cbst", portion=0.2, num_classes=3,
                                           class_names=NAMES, recipe=RECIPE)) as w:
        for k in range(3):
            if task == "segmentation":
                labels = np.where(rng.random((4, 5)) < 0.3, 255, rng.integers(0, 3, (4, 5))).astype(np.uint8)
                w.add_segmentation(f"img{k}", labels, rng.random((4, 5)).astype(np.float32))
            else:
                boxes = np.array([[0, 0, 4, 4], [1, 1, 3, 5]], np.float32)[:k]
                w.add_detection(f"img{k}", boxes, np.arange(1, k + 1), np.full(k, 0.9, np.float32))
        if task == "segmentation":
            w.finish(thresholds=[0.9, 0.5, 0.7], predicted_pixels=[5, 6, 7], selected_pixels=[1, 2, 3],
                     histogram=np.ones((3, 4), np.int64))
        else:
            w.finish(thresholds=[0.5, 0.5, 0.5])
    return path


def attrs(**values) -> Callable[[h5py.File], None]:
    def edit(f: h5py.File) -> None:
        for key, value in values.items():
            if value is None:
                del f.attrs[key]
            else:
                f.attrs[key] = value
    return edit


def replace(name: str, data) -> Callable[[h5py.File], None]:
    def edit(f: h5py.File) -> None:
        del f[name]
        if data is not None:
            f.create_dataset(name, data=data)
    return edit


def group(name: str) -> Callable[[h5py.File], None]:
    def edit(f: h5py.File) -> None:
        del f[name]
        f.create_group(name)
    return edit


def ids(*values: str):
    return replace("image_ids", np.asarray(values, dtype=object).astype(h5py.string_dtype("utf-8")))


SEG, DET = "segmentation", "detection"
EDITS = [  # (case, task, h5py edit, words the message must hold)
    ("format-other", SEG, attrs(format="other.tool/2"), "not a selftrain pseudo-label file"),
    ("format-missing", DET, attrs(format=None), "not a selftrain pseudo-label file"),
    ("complete-missing", SEG, attrs(complete=None), "incomplete"),
    ("complete-int", SEG, attrs(complete=1), "incomplete"),
    ("task-unknown", SEG, attrs(task="classification"), "classification"),
    ("round-negative", SEG, attrs(round=-1), "'round'"),
    ("round-text", DET, attrs(round="two"), "'round'"),
    ("round-float", SEG, attrs(round=1.5), "'round'"),
    ("round-missing", DET, attrs(round=None), "'round'"),
    ("num-classes-zero", SEG, attrs(num_classes=0), "'num_classes'"),
    ("num-classes-more-than-names", SEG, attrs(num_classes=5), "'class_names'"),
    ("num-classes-array", DET, attrs(num_classes=np.array([3, 3])), "'num_classes'"),
    ("class-names-short", DET, attrs(class_names=["road", "car"]), "'class_names'"),
    ("class-names-numbers", SEG, attrs(class_names=np.array([1, 2, 3])), "'class_names'"),
    ("class-names-one-text", SEG, attrs(class_names="road"), "'class_names'"),
    ("ignore-index-a-class", SEG, attrs(ignore_index=1), "ignore_index"),
    ("ignore-index-above-uint8", SEG, attrs(ignore_index=300), "ignore_index"),
    ("portion-above-one", SEG, attrs(portion=2.0), "'portion'"),
    ("portion-nan", DET, attrs(portion=float("nan")), "'portion'"),
    ("policy-number", SEG, attrs(policy=3), "'policy'"),
    ("recipe-missing", DET, attrs(recipe=None), "'recipe'"),
    ("image-ids-missing", SEG, replace("image_ids", None), "'image_ids'"),
    ("image-ids-numbers", SEG, replace("image_ids", np.arange(3)), "'image_ids'"),
    ("image-ids-repeated", SEG, ids("img0", "img0", "img2"), "more than once"),
    ("image-ids-fewer-than-labels", SEG, ids("img0", "img1"), "'labels'"),
    ("image-ids-more-than-offsets", DET, ids("a", "b", "c", "d"), "'offsets'"),
    ("labels-missing", SEG, replace("labels", None), "'labels'"),
    ("confidence-missing", SEG, replace("confidence", None), "'confidence'"),
    ("labels-float", SEG, replace("labels", np.zeros((3, 4, 5), np.float32)), "dtype"),
    ("labels-2d", SEG, replace("labels", np.zeros((3, 20), np.uint8)), "shape"),
    ("labels-a-group", SEG, group("labels"), "not a dataset"),
    ("confidence-other-size", SEG, replace("confidence", np.zeros((3, 4, 6), np.float16)), "differ in shape"),
    ("confidence-text", SEG, replace("confidence", np.full((3, 4, 5), b"x")), "dtype"),
    ("thresholds-wrong-length", SEG, replace("thresholds", np.ones(2, np.float32)), "'thresholds'"),
    ("selected-pixels-float", SEG, replace("selected_pixels", np.ones(3)), "'selected_pixels'"),
    ("histogram-1d", SEG, replace("histogram", np.ones(12)), "'histogram'"),
    ("offsets-missing", DET, replace("offsets", None), "'offsets'"),
    ("offsets-not-from-zero", DET, replace("offsets", np.array([1, 1, 2, 3])), "'offsets'"),
    ("offsets-going-back", DET, replace("offsets", np.array([0, 2, 1, 3])), "'offsets'"),
    ("offsets-past-the-boxes", DET, replace("offsets", np.array([0, 0, 1, 4])), "'offsets'"),
    ("offsets-float", DET, replace("offsets", np.array([0.0, 0, 1, 3])), "'offsets'"),
    ("boxes-three-columns", DET, replace("boxes", np.zeros((3, 3), np.float32)), "'boxes'"),
    ("scores-short", DET, replace("scores", np.zeros(2, np.float32)), "'scores'"),
    ("srrs-missing", DET, replace("srrs", None), "'srrs'"),
    ("box-label-background", DET, replace("labels", np.array([0, 1, 2])), "label 0"),
    ("box-label-past-classes", DET, replace("labels", np.array([1, 4, 2])), "label 4"),
]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def foreign_program(path: Path) -> None:
    path.unlink()
    with h5py.File(path, "w") as f:
        f.attrs["creator"] = "another program"
        f.create_dataset("images", data=np.zeros((2, 4, 4)))


BYTES = [  # (case, task, edit of the file as a whole, words the message must hold)
    ("zero-bytes", SEG, lambda p: p.write_bytes(b""), "not an HDF5 file"),
    ("text-file", DET, lambda p: p.write_text("round: 1\nlabels: none\n"), "not an HDF5 file"),
    ("truncated", SEG, truncate, "corrupt HDF5 file"),
    ("truncated-detection", DET, truncate, "corrupt HDF5 file"),
    ("hdf5-header-only", SEG, lambda p: p.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64), "HDF5"),
    ("hdf5-of-another-program", DET, foreign_program, "not a selftrain pseudo-label file"),
    ("a-folder", SEG, lambda p: (p.unlink(), p.mkdir()), "not a file"),
    ("missing", DET, lambda p: p.unlink(), "does not exist"),
]


def assert_one_line(info: pytest.ExceptionInfo, path: Path, words: str) -> None:
    message = str(info.value)
    assert "\n" not in message and message.count(str(path)) >= 1, message
    assert words in message, message
    assert "; " in message, "the message names a fix after the problem"


@pytest.mark.parametrize("case, task, edit, words", EDITS, ids=[c[0] for c in EDITS])
def test_edited_file_is_refused(tmp_path, case, task, edit, words):
    path = write_valid(tmp_path / "round_001.h5", task)
    with h5py.File(path, "r+") as f:
        edit(f)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(StoreError) as info:
        open_round(path)
    assert_one_line(info, path, words)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert not written_by(path, 1, RECIPE)


@pytest.mark.parametrize("case, task, edit, words", BYTES, ids=[c[0] for c in BYTES])
def test_broken_or_foreign_file_is_refused(tmp_path, case, task, edit, words):
    path = write_valid(tmp_path / "round_001.h5", task)
    edit(path)
    with pytest.raises(StoreError) as info:
        open_round(path)
    assert_one_line(info, path, words)


@pytest.mark.parametrize("task", [SEG, DET])
def test_valid_files_read_and_match_their_run(tmp_path, task):
    path = write_valid(tmp_path / "round_001.h5", task)
    with open_round(path, expect_task=task, expect_num_classes=3, expect_class_names=NAMES, expect_round=1,
                    expect_recipe=RECIPE, expect_recipe_sha256=recipe_sha256(RECIPE)) as reader:
        assert reader.image_ids == ["img0", "img1", "img2"] and reader.meta["class_names"] == NAMES
        if task == SEG:
            assert reader.image_shape == (4, 5) and reader.labels(2).shape == (4, 5)
            assert reader.label_rows(0, 3).shape == (3, 4, 5) and reader.confidence(0).dtype == np.float32
        else:
            assert [len(reader.boxes(i)["labels"]) for i in range(3)] == [0, 1, 2]
            assert reader.label_rows(0, None).tolist() == [1, 1, 2]
    assert written_by(path, 1, RECIPE) and not written_by(path, 2, RECIPE) and not written_by(path, 1, "other")


def test_empty_segmentation_file_reads(tmp_path):
    path = tmp_path / "round_001.h5"
    with PseudoLabelWriter(path, RoundMeta(task=SEG, round=1, policy="st", portion=0.5, num_classes=3,
                                           class_names=NAMES)) as w:
        w.finish()
    with open_round(path) as reader:
        assert len(reader) == 0 and reader.image_shape is None


EXPECTATIONS = [
    ({"expect_task": DET}, "task='segmentation'"),
    ({"expect_num_classes": 19}, "num_classes=3"),
    ({"expect_class_names": ["road", "sky", "car"]}, "class_names="),
    ({"expect_round": 2}, "round=1"),
    ({"expect_recipe": RECIPE + "seed: 1\n"}, "another recipe"),
    ({"expect_recipe_sha256": recipe_sha256("name: other\n")}, "another recipe"),
]


@pytest.mark.parametrize("expect, words", EXPECTATIONS, ids=[next(iter(e)) for e, _ in EXPECTATIONS])
def test_file_of_another_run_is_refused(tmp_path, expect, words):
    path = write_valid(tmp_path / "round_001.h5", SEG)
    with pytest.raises(StoreError) as info:
        open_round(path, **expect)
    assert_one_line(info, path, words)
    assert "another run" in str(info.value)


def test_label_value_outside_the_classes_is_refused_when_read(tmp_path):
    path = write_valid(tmp_path / "round_001.h5", SEG)
    with h5py.File(path, "r+") as f:
        f["labels"][1, 2, 3] = 7
    with open_round(path) as reader:
        assert reader.labels(0).shape == (4, 5)
        for read in (lambda: reader.labels(1), lambda: reader.label_rows(0, 3)):
            with pytest.raises(StoreError) as info:
                read()
            assert_one_line(info, path, "label 7")


def test_damaged_chunk_is_refused_when_read(tmp_path):
    path = write_valid(tmp_path / "round_001.h5", SEG)
    with h5py.File(path, "r") as f:
        offset = f["labels"].id.get_chunk_info(1).byte_offset
    data = bytearray(path.read_bytes())
    data[offset: offset + 8] = b"\xff" * 8  # the gzip stream of image 1's labels
    path.write_bytes(bytes(data))
    with open_round(path) as reader:
        with pytest.raises(StoreError) as info:
            reader.labels(1)
    assert_one_line(info, path, "'labels'")
