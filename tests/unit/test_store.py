"""Pseudo-label HDF5 files (DESIGN §5): round trips, plain-h5py layout, atomicity, refusals, workers."""

from __future__ import annotations

import hashlib
import os
import pickle

import h5py
import numpy as np
import pytest
import torch

import selftrain
from selftrain.errors import StoreError
from selftrain.store import FORMAT, PseudoLabelWriter, RoundMeta, open_round

NAMES = ["road", "car", "sky"]
RECIPE = "policy:\n  name: cbst\n  portion: 0.2\n"


def writer(path, task="segmentation", **overrides):
    kwargs = dict(task=task, round=2, policy="cbst", portion=0.2, num_classes=3, class_names=NAMES,
                  recipe=RECIPE, checkpoint="runs/x/checkpoints/round_001.pt")  # fmt: skip
    kwargs.update(overrides)
    options = {k: kwargs.pop(k) for k in ("image_shape", "compression") if k in kwargs}
    return PseudoLabelWriter(path, RoundMeta(**kwargs), **options)


def seg_data(seed=0, n=3, shape=(6, 7)):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=(n, *shape)).astype(np.uint8)
    labels[rng.random((n, *shape)) < 0.3] = 255
    confidence = rng.uniform(1, 3, size=(n, *shape)).astype(np.float32)
    return [f"img_{i}" for i in range(n)], labels, confidence


def write_seg(path, seed=0, n=3, **overrides):
    ids, labels, confidence = seg_data(seed, n)
    with writer(path, **overrides) as w:
        for i, image_id in enumerate(ids):
            w.add_segmentation(image_id, labels[i], torch.from_numpy(confidence[i]))
        w.finish(thresholds=[0.9, 0.5, 0.7], predicted_pixels=[10, 20, 30], selected_pixels=[2, 4, 6],
                 histogram=np.arange(12).reshape(3, 4))  # fmt: skip
    return ids, labels, confidence


DET = [
    ("a", np.array([[0, 0, 10, 10], [5, 5, 20, 30]], np.float32), np.array([1, 2]), np.array([0.9, 0.8]), [0.5, 0.25]),
    ("b", np.zeros((0, 4)), np.zeros(0), np.zeros(0), None),
    ("c", np.array([[1.5, 2.5, 3.5, 4.5]]), np.array([3]), np.array([0.7]), None),
]


def write_det(path):
    with writer(path, task="detection") as w:
        for image_id, boxes, labels, scores, srrs in DET:
            w.add_detection(image_id, boxes, labels, scores, srrs=srrs)
        w.finish(thresholds=[0.5, 0.6, 0.7])


def test_segmentation_round_trip(tmp_path):
    path = tmp_path / "pseudo" / "round_002.h5"
    ids, labels, confidence = write_seg(path)
    with open_round(path) as r:
        assert len(r) == 3 and r.image_ids == ids and r.index_of("img_2") == 2
        assert r.meta["format"] == FORMAT and r.meta["task"] == "segmentation" and r.meta["round"] == 2
        assert r.meta["policy"] == "cbst" and r.meta["portion"] == pytest.approx(0.2)
        assert r.meta["num_classes"] == 3 and r.meta["class_names"] == NAMES and r.meta["ignore_index"] == 255
        assert r.meta["recipe"] == RECIPE and r.meta["checkpoint"].endswith("round_001.pt")
        assert r.meta["selftrain_version"] == selftrain.__version__ and r.meta["complete"] is True
        assert "T" in r.meta["created"]
        for i in range(3):
            got = r.labels(i)
            assert got.dtype == np.uint8 and got.shape == (6, 7)
            np.testing.assert_array_equal(got, labels[i])
            conf = r.confidence(i)
            assert conf.dtype == np.float32
            np.testing.assert_allclose(conf, confidence[i], rtol=1e-3)
        assert r.thresholds.dtype == np.float32
        np.testing.assert_allclose(r.thresholds, [0.9, 0.5, 0.7])
        assert r.predicted_pixels.dtype == np.int64 and r.predicted_pixels.tolist() == [10, 20, 30]
        assert r.selected_pixels.tolist() == [2, 4, 6] and r.histogram.shape == (3, 4)
        with pytest.raises(KeyError, match="nope"):
            r.index_of("nope")
        with pytest.raises(IndexError):
            r.labels(3)


def test_segmentation_opens_with_plain_h5py(tmp_path):
    path = tmp_path / "round_002.h5"
    ids, labels, confidence = write_seg(path)
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == FORMAT and bool(f.attrs["complete"]) and f.attrs["task"] == "segmentation"
        assert [str(s) for s in f.attrs["class_names"]] == NAMES
        assert list(f["image_ids"].asstr()[()]) == ids
        assert f["labels"].dtype == np.uint8 and f["labels"].shape == (3, 6, 7) and f["labels"].chunks == (1, 6, 7)
        assert f["confidence"].dtype == np.float16 and f["confidence"].maxshape == (None, 6, 7)
        assert f["thresholds"].dtype == np.float32 and f["selected_pixels"].dtype == np.int64
        np.testing.assert_array_equal(f["labels"][1], labels[1])


def test_detection_round_trip_with_empty_image(tmp_path):
    path = tmp_path / "round_002.h5"
    write_det(path)
    with open_round(path) as r:
        assert r.meta["task"] == "detection" and r.image_ids == ["a", "b", "c"]
        np.testing.assert_allclose(r.thresholds, [0.5, 0.6, 0.7])
        for i, (_, boxes, labels, scores, srrs) in enumerate(DET):
            got = r.boxes(i)
            assert got["boxes"].dtype == np.float32 and got["boxes"].shape == (len(labels), 4)
            assert got["labels"].dtype == np.int64 and got["scores"].dtype == np.float32
            assert got["srrs"].dtype == np.float32
            np.testing.assert_allclose(got["boxes"], boxes.reshape(-1, 4))
            np.testing.assert_array_equal(got["labels"], labels)
            np.testing.assert_allclose(got["scores"], scores)
            if srrs is None:
                assert np.isnan(got["srrs"]).all()
            else:
                np.testing.assert_allclose(got["srrs"], srrs)
    with h5py.File(path, "r") as f:
        assert f["offsets"][()].tolist() == [0, 2, 2, 3] and f["offsets"].dtype == np.int64
        assert f["boxes"].shape == (3, 4) and f["labels"].dtype == np.int64 and f["scores"].shape == (3,)


def test_all_empty_detection_file(tmp_path):
    path = tmp_path / "round_000.h5"
    with writer(path, task="detection") as w:
        w.add_detection("x", [], [], [])
        w.finish()
    with open_round(path) as r:
        got = r.boxes(0)
        assert got["boxes"].shape == (0, 4) and got["labels"].shape == (0,) and r.thresholds is None


def test_exception_in_with_block_keeps_older_file(tmp_path):
    path = tmp_path / "round_002.h5"
    write_seg(path, seed=1)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(RuntimeError, match="boom"):
        with writer(path) as w:
            w.add_segmentation("z", np.zeros((6, 7), np.uint8), np.ones((6, 7)))
            raise RuntimeError("boom")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert os.listdir(tmp_path) == ["round_002.h5"]
    assert open_round(path).image_ids == ["img_0", "img_1", "img_2"]


def test_no_file_without_finish(tmp_path):
    path = tmp_path / "round_003.h5"
    with pytest.raises(RuntimeError, match="finish"):
        with writer(path) as w:
            w.add_segmentation("z", np.zeros((6, 7), np.uint8), np.ones((6, 7)))
    with writer(path) as w:
        w.abort()
    assert os.listdir(tmp_path) == []


def make_h5(path, **attrs):
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.arange(3))
        f.attrs.update(attrs)


@pytest.mark.parametrize("complete", [None, False])
def test_incomplete_file_is_refused(tmp_path, complete):
    path = tmp_path / "round_001.h5"
    attrs = {"format": FORMAT, "task": "segmentation"}
    if complete is not None:
        attrs["complete"] = complete
    make_h5(path, **attrs)
    with pytest.raises(StoreError, match=r"incomplete.*--resume") as info:
        open_round(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_foreign_and_non_hdf5_and_missing_files_are_refused(tmp_path):
    foreign = tmp_path / "foreign.h5"
    make_h5(foreign)
    with pytest.raises(StoreError, match="not a selftrain pseudo-label file"):
        open_round(foreign)
    make_h5(foreign, format="other.tool/3", complete=True)
    with pytest.raises(StoreError, match="other.tool/3"):
        open_round(foreign)
    text = tmp_path / "round_001.h5"
    text.write_text("not hdf5\n")
    with pytest.raises(StoreError, match="not an HDF5 file"):
        open_round(text)
    with pytest.raises(StoreError, match="does not exist"):
        open_round(tmp_path / "absent.h5")


def test_task_mismatch_is_refused(tmp_path):
    write_seg(tmp_path / "seg.h5")
    write_det(tmp_path / "det.h5")
    with pytest.raises(StoreError, match="segmentation"):
        open_round(tmp_path / "seg.h5").boxes(0)
    det = open_round(tmp_path / "det.h5")
    with pytest.raises(StoreError, match="detection"):
        det.labels(0)
    with pytest.raises(StoreError, match="detection"):
        det.confidence(0)


def test_writer_validates_inputs(tmp_path):
    with writer(tmp_path / "a.h5", image_shape=(6, 7)) as w:
        with pytest.raises(ValueError, match="5x7"):
            w.add_segmentation("x", np.zeros((5, 7), np.uint8), np.zeros((5, 7)))
        w.add_segmentation("x", np.zeros((6, 7), np.uint8), np.zeros((6, 7)))
        with pytest.raises(ValueError, match="unique"):
            w.add_segmentation("x", np.zeros((6, 7), np.uint8), np.zeros((6, 7)))
        with pytest.raises(ValueError, match=r"\[0, 255\]"):
            w.add_segmentation("y", np.full((6, 7), 256), np.zeros((6, 7)))
        with pytest.raises(ValueError, match="detection writer"):
            w.add_detection("y", np.zeros((0, 4)), [], [])
        with pytest.raises(ValueError, match="one per class"):
            w.finish(thresholds=[0.5])
        w.finish(thresholds=[0.5, 0.5, 0.5])
    assert len(open_round(tmp_path / "a.h5")) == 1
    with pytest.raises(ValueError, match="class_names"):
        writer(tmp_path / "b.h5", num_classes=4)
    with pytest.raises(TypeError, match="RoundMeta"):
        PseudoLabelWriter(tmp_path / "c.h5", "segmentation")


def test_large_confidence_is_clipped_not_inf(tmp_path):
    path = tmp_path / "r.h5"
    with writer(path) as w:
        w.add_segmentation("x", np.zeros((2, 2), np.uint8), np.full((2, 2), 1e6))
        w.finish()
    assert np.isfinite(open_round(path).confidence(0)).all()


def test_reader_pickles_without_its_handle(tmp_path):
    path = tmp_path / "r.h5"
    _, labels, _ = write_seg(path)
    reader = open_round(path)
    reader.labels(0)  # opens the handle in this process
    clone = pickle.loads(pickle.dumps(reader))
    np.testing.assert_array_equal(clone.labels(2), labels[2])
    clone.close()
    reader.close()


class PseudoDataset(torch.utils.data.Dataset):
    def __init__(self, reader):
        self.reader = reader

    def __len__(self):
        return len(self.reader)

    def __getitem__(self, i):
        labels = torch.from_numpy(self.reader.labels(i))
        assert self.reader._pid == os.getpid(), "the worker must open its own handle, not reuse the parent's"
        return labels, os.getpid()


def test_dataloader_workers_read_the_file(tmp_path):
    path = tmp_path / "r.h5"
    _, labels, _ = write_seg(path, n=6)
    reader = open_round(path)
    reader.labels(0)  # the parent holds an open handle before the workers start
    loader = torch.utils.data.DataLoader(PseudoDataset(reader), batch_size=None, num_workers=2)
    got = list(loader)
    assert len(got) == 6
    for i, (lab, _) in enumerate(got):
        np.testing.assert_array_equal(lab.numpy(), labels[i])
    assert os.getpid() not in {int(pid) for _, pid in got}
    reader.close()
