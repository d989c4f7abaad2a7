"""The embedded detection benchmark: determinism, coverage, box validity, domain gap, speed, files."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from selftrain.data import synth_det
from selftrain.data.detsets import DET_DATASETS, build_det_dataset
from selftrain.data.synth_det import (
    ASPECTS,
    CLASS_NAMES,
    MIN_OBJECT,
    MIN_VISIBLE,
    NUM_CLASSES,
    SPLITS,
    render,
)
from selftrain.errors import DataError

N = 50  # images per split for coverage and statistics (about 0.2 s per split)


@pytest.fixture(scope="module")
def renders():
    return {split: [render(split, i) for i in range(N)] for split in SPLITS}


def test_public_tables_are_consistent():
    assert CLASS_NAMES == ("car", "person", "bicycle", "bird", "bottle", "dog") and NUM_CLASSES == 6
    assert len(ASPECTS) == NUM_CLASSES and SPLITS == ("source", "target_train", "target_val")
    assert "synth_shapes" in DET_DATASETS


@pytest.mark.parametrize("split", SPLITS)
def test_shapes_dtypes_and_ranges(split, renders):
    for r in renders[split]:
        assert r.image.shape == (128, 128, 3) and r.image.dtype == np.uint8
        assert r.boxes.dtype == np.float32 and r.boxes.shape == (len(r.labels), 4)
        assert r.labels.dtype == np.int64 and 2 <= len(r.labels) <= 6
        assert r.labels.min() >= 1 and r.labels.max() <= NUM_CLASSES
        assert r.instances.shape == (128, 128) and r.instances.max() == len(r.labels)


def test_render_is_deterministic_and_streams_differ():
    a = render("target_train", 3, seed=5)
    b = render("target_train", 3, seed=5)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    for other in (render("target_train", 3, seed=6), render("target_train", 4, seed=5),
                  render("target_val", 3, seed=5), render("source", 3, seed=5)):
        assert not np.array_equal(a.image, other.image)
    alone = render("source", 11)
    for i in range(3):
        render("source", i)
    np.testing.assert_array_equal(alone.image, render("source", 11).image)


@pytest.mark.parametrize("split", SPLITS)
def test_every_class_appears_in_every_split(split, renders):
    counts = np.bincount(np.concatenate([r.labels for r in renders[split]]), minlength=NUM_CLASSES + 1)[1:]
    assert (counts >= 10).all(), dict(zip(CLASS_NAMES, counts))


@pytest.mark.parametrize("split", SPLITS)
def test_boxes_are_the_bounding_boxes_of_the_rendered_object_masks(split, renders):
    for r in renders[split]:
        h, w = r.instances.shape
        for m, box in enumerate(r.boxes):
            rows, cols = np.nonzero(r.instances == m + 1)
            np.testing.assert_array_equal(box, [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
            assert 0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h


def test_objects_are_small_and_large_and_some_overlap(renders):
    boxes = np.concatenate([r.boxes for split in SPLITS for r in renders[split]])
    longer = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    assert longer.min() <= 1.2 * MIN_OBJECT and (longer <= 16).sum() > 20 and longer.max() >= 60
    overlapping = 0
    for r in renders["source"]:
        x0, y0 = np.maximum(r.boxes[:, None, :2], r.boxes[None, :, :2]).transpose(2, 0, 1)
        x1, y1 = np.minimum(r.boxes[:, None, 2:], r.boxes[None, :, 2:]).transpose(2, 0, 1)
        overlapping += int(np.triu((x1 > x0) & (y1 > y0), 1).any())
    assert overlapping >= 10


def test_occluded_objects_keep_at_least_half_of_their_pixels():
    hidden = []
    for i in range(40):
        objs, inst = synth_det._sample_scene(np.random.default_rng([0, 0, i, 0]), 128, 128)
        for m, o in enumerate(objs):
            full = int((o.parts > 0).sum())
            visible = int((inst == m + 1).sum())
            assert visible >= MIN_VISIBLE * full
            hidden.append(1 - visible / full)
    assert max(hidden) > 0.2  # occlusion does happen


def _roughness(image: np.ndarray, mask: np.ndarray) -> float:
    """Median absolute difference between horizontal neighbours that both lie in ``mask``."""
    diff = np.abs(np.diff(image.astype(np.float32), axis=1)).mean(-1)
    return float(np.median(diff[mask[:, 1:] & mask[:, :-1]]))


def test_appearance_differs_between_domains_while_silhouettes_are_shared(renders):
    src, tgt = renders["source"], renders["target_train"]
    # texture: grainy shaded photo objects and backgrounds vs flat clipart fills
    assert np.median([_roughness(r.image, r.instances > 0) for r in src]) > 3.0
    assert np.median([_roughness(r.image, r.instances > 0) for r in tgt]) == 0.0
    assert np.median([_roughness(r.image, r.instances == 0) for r in src]) > 3.0
    assert np.median([_roughness(r.image, r.instances == 0) for r in tgt]) == 0.0

    def rim_brightness(rs):  # object pixels next to the background
        values = []
        for r in rs:
            inside, pad = r.instances > 0, np.pad(r.instances == 0, 1, constant_values=True)
            rim = inside & (pad[:-2, 1:-1] | pad[2:, 1:-1] | pad[1:-1, :-2] | pad[1:-1, 2:])
            values.append(r.image[rim].mean())
        return np.median(values)
    assert rim_brightness(tgt) < 50 < rim_brightness(src)  # dark outlines only in the target

    def aspects(rs):  # box width / height per class: the same silhouettes in both domains
        boxes, labels = np.concatenate([r.boxes for r in rs]), np.concatenate([r.labels for r in rs])
        ratio = (boxes[:, 2] - boxes[:, 0]) / (boxes[:, 3] - boxes[:, 1])
        return np.array([np.median(ratio[labels == c + 1]) for c in range(NUM_CLASSES)])
    np.testing.assert_allclose(aspects(src), aspects(tgt), rtol=0.25)


def test_render_is_fast():
    """The budget is 5 ms per 128x128 image on one idle core; CPU time, generous for shared machines."""
    render("source", 999)
    start = time.process_time()
    for i in range(40):
        for split in ("source", "target_train"):
            render(split, 1000 + i)
    assert (time.process_time() - start) / 80 < 0.012


def test_render_rejects_bad_arguments():
    with pytest.raises(ValueError, match="valid splits"):
        render("target", 0)
    with pytest.raises(ValueError, match="height must be an integer >= 32"):
        render("source", 0, height=16)
    with pytest.raises(ValueError, match="index and seed must be >= 0"):
        render("source", -1)


@pytest.mark.parametrize("image_format", ["png", "jpg"])
def test_written_benchmark_reads_back_through_the_voc_loader(tmp_path, image_format):
    out = synth_det.write_det_benchmark(tmp_path / "bench", seed=3, num_source=3, num_target_train=2,
                                        num_target_val=2, height=64, width=96, image_format=image_format)
    meta = yaml.safe_load((out / "benchmark.yaml").read_text())
    assert meta["class_names"] == list(CLASS_NAMES) and meta["counts"]["source"] == 3
    for split, n in (("source", 3), ("target_train", 2), ("target_val", 2)):
        ds = build_det_dataset("voc", root=str(out), split=split, options={}, class_names=CLASS_NAMES)
        assert ds.ids == [f"{split}_{i:05d}" for i in range(n)]
        for i in range(n):
            ref, sample = render(split, i, seed=3, height=64, width=96), ds[i]
            np.testing.assert_array_equal(sample["boxes"].numpy(), ref.boxes)
            np.testing.assert_array_equal(sample["labels"].numpy(), ref.labels)
            assert not sample["difficult"].any()
            pixels = np.asarray(Image.open(ds.items[i].image))
            if image_format == "png":
                np.testing.assert_array_equal(pixels, ref.image)
            else:
                assert np.abs(pixels.astype(int) - ref.image).mean() < 8


def test_synth_shapes_data_set_serves_the_rendered_benchmark(tmp_path):
    ds = build_det_dataset("synth_shapes", root=None, split="target_val", options={"num_images": 4, "height": 64},
                           class_names=CLASS_NAMES)
    assert len(ds) == 4 and ds.class_names == CLASS_NAMES
    sample, ref = ds[2], render("target_val", 2, height=64)
    assert sample["id"] == "target_val_00002" and tuple(sample["image"].shape) == (3, 64, 128)
    torch.testing.assert_close(sample["image"], torch.from_numpy(ref.image).permute(2, 0, 1).float() / 255)
    np.testing.assert_array_equal(sample["boxes"].numpy(), ref.boxes)
    assert sample["labels"].dtype == torch.int64 and sample["difficult"].dtype == torch.bool
    hidden = build_det_dataset("synth_shapes", root=None, split="target_val", options={"num_images": 4},
                               with_labels=False)
    assert hidden[0]["boxes"].shape == (0, 4) and len(hidden.ground_truth(0)["boxes"]) >= 2
    (tmp_path / "ids.txt").write_text("target_val_00003\ntarget_val_00001\n")
    subset = build_det_dataset("synth_shapes", root=None, split="target_val",
                               options={"num_images": 4, "list_file": str(tmp_path / "ids.txt")})
    assert subset.ids == ["target_val_00003", "target_val_00001"]
    np.testing.assert_array_equal(subset[1]["boxes"].numpy(), render("target_val", 1).boxes)
    with pytest.raises(DataError, match="takes no root"):
        build_det_dataset("synth_shapes", root=str(tmp_path), split="source", options={})
    with pytest.raises(DataError, match="set class_names to exactly these"):
        build_det_dataset("synth_shapes", root=None, split="source", options={}, class_names=["car"])
    with pytest.raises(DataError, match="choose one of: source, target_train, target_val"):
        build_det_dataset("synth_shapes", root=None, split="val", options={})
