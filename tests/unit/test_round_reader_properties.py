"""Property: a round file with random attribute edits, damaged data bytes or a random length either
reads as consistent data or is refused with a StoreError, never another exception.

Bytes are damaged inside the stored data of the fixed-size datasets (labels, confidence, boxes, ...).
HDF5 itself (2.0) can loop forever or crash on a damaged object header or global heap (the
variable-length strings of the attributes and ``image_ids``) before any Python code sees a value,
so those regions are left to the edit-by-edit cases of test_round_reader_checks.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selftrain.errors import StoreError
from selftrain.store import PseudoLabelWriter, RoundMeta, open_round

NAMES = ["road", "car", "sky"]
ATTRS = ["format", "task", "round", "policy", "portion", "num_classes", "class_names", "ignore_index", "recipe",
         "complete", "checkpoint"]
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def valid_bytes(task: str) -> bytes:
    """A small valid round file (3 images) as bytes; written without compression so damaged bytes
    land in the data as well as in the HDF5 structure."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "round_001.h5"
        rng = np.random.default_rng(1)
        with PseudoLabelWriter(path, RoundMeta(task=task, round=1, policy="cbst", portion=0.2, num_classes=3,
                                               class_names=NAMES, recipe="name: x\n"), compression=None) as w:
            for k in range(3):
                if task == "segmentation":
                    labels = np.where(rng.random((4, 5)) < 0.3, 255, rng.integers(0, 3, (4, 5))).astype(np.uint8)
                    w.add_segmentation(f"img{k}", labels, rng.random((4, 5)).astype(np.float32))
                else:
                    boxes = np.array([[0, 0, 4, 4], [1, 1, 3, 5]], np.float32)[:k]
                    w.add_detection(f"img{k}", boxes, np.arange(1, k + 1), np.full(k, 0.9, np.float32))
            w.finish(thresholds=[0.9, 0.5, 0.7], selected_pixels=[1, 2, 3])
        return path.read_bytes()


def data_regions(raw: bytes) -> list[tuple[int, int]]:
    """(start, stop) byte ranges of the stored data of every fixed-size dataset."""
    regions = []
    with h5py.File(io.BytesIO(raw), "r") as f:
        for name, dataset in f.items():
            if h5py.check_string_dtype(dataset.dtype) is not None:
                continue
            if dataset.chunks:
                chunks = [dataset.id.get_chunk_info(k) for k in range(dataset.id.get_num_chunks())]
                regions += [(c.byte_offset, c.byte_offset + c.size) for c in chunks]
            else:
                regions.append((dataset.id.get_offset(), dataset.id.get_offset() + dataset.id.get_storage_size()))
    return regions


VALID = {task: valid_bytes(task) for task in ("segmentation", "detection")}
REGIONS = {task: data_regions(raw) for task, raw in VALID.items()}
TEXT = st.characters(exclude_characters="\x00")  # HDF5 strings cannot hold NUL
VALUES = st.one_of(
    st.none(),  # delete the attribute
    st.integers(-300, 300), st.floats(allow_nan=True), st.booleans(), st.text(TEXT, max_size=12),
    st.sampled_from(["segmentation", "detection", "selftrain.pseudo/1"]),
    st.lists(st.text(TEXT, max_size=6), max_size=4), st.lists(st.integers(-2, 300), min_size=1, max_size=4),
)


def read_everything(path: Path) -> None:
    """Open and read every image; check that what comes back agrees with the file's own metadata."""
    with open_round(path) as reader:
        meta, n = reader.meta, len(reader)
        num_classes, ignore = meta["num_classes"], meta["ignore_index"]
        assert len(meta["class_names"]) == num_classes and len(set(reader.image_ids)) == n
        for i in range(n):
            if reader.task == "segmentation":
                labels, confidence = reader.labels(i), reader.confidence(i)
                assert labels.shape == confidence.shape == reader.image_shape
                assert ((labels < num_classes) | (labels == ignore)).all()
            else:
                found = reader.boxes(i)
                k = len(found["labels"])
                assert found["boxes"].shape == (k, 4) and found["scores"].shape == found["srrs"].shape == (k,)
                assert ((found["labels"] >= 1) & (found["labels"] <= num_classes)).all()


def read_or_refuse(path: Path) -> None:
    try:
        read_everything(path)
    except StoreError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


@SETTINGS
@given(task=st.sampled_from(sorted(VALID)), edits=st.dictionaries(st.sampled_from(ATTRS), VALUES, min_size=1,
                                                                   max_size=3))
def test_random_attribute_edits(folder, task, edits):
    path = folder / "round_001.h5"
    path.write_bytes(VALID[task])
    with h5py.File(path, "r+") as f:
        for key, value in edits.items():
            if value is None:
                f.attrs.pop(key, None)
            elif isinstance(value, list) and value and isinstance(value[0], int):
                f.attrs[key] = np.asarray(value)
            else:
                f.attrs[key] = value
    read_or_refuse(path)


@SETTINGS
@given(task=st.sampled_from(sorted(VALID)), data=st.data())
def test_random_damaged_bytes(folder, task, data):
    raw = bytearray(VALID[task])
    places = st.sampled_from(REGIONS[task]).flatmap(lambda r: st.integers(r[0], r[1] - 1))
    damage = data.draw(st.lists(st.tuples(places, st.integers(0, 255)), min_size=1, max_size=8))
    for offset, value in damage:
        raw[offset] = value
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    path = folder / "round_001.h5"
    path.write_bytes(bytes(raw))
    read_or_refuse(path)
