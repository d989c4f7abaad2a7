"""synth_shapes_fog: Koschmieder's law over synthetic depth, beta 0, same_scenes, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest

from selftrain.data import synth_det
from selftrain.data.detsets import build_det_dataset
from selftrain.data.synth_det import (AIRLIGHT, FOG_BETA, GROUND_DEPTH, OBJECT_DEPTH, fog_depth, koschmieder,
                                      render, render_fog, transmission)
from selftrain.errors import DataError


def test_transmission_and_the_foggy_image_follow_koschmieder():
    depth = np.array([[0.0, 10.0], [50.0, 150.0]], np.float32)
    t = transmission(depth, 0.02)
    expected = [[1.0, math.exp(-0.2)], [math.exp(-1.0), math.exp(-3.0)]]
    np.testing.assert_allclose(t, expected, rtol=1e-6)
    clear = np.arange(12, dtype=np.float32).reshape(2, 2, 3) * 20
    foggy = koschmieder(clear, t, 200.0)
    for (i, j), c in np.ndenumerate(clear[..., 0]):
        for k in range(3):
            direct = clear[i, j, k] * expected[i][j] + 200.0 * (1 - expected[i][j])
            assert foggy[i, j, k] == pytest.approx(direct, rel=1e-5)


def test_depth_is_a_ground_plane_with_nearer_objects_in_painting_order():
    inst = np.zeros((64, 32), np.int16)
    inst[5:20, 2:10], inst[30:40, 5:25], inst[35:38, 20:30] = 1, 2, 3
    depth = fog_depth(inst, np.random.default_rng(0))
    background = depth[:, 31]  # no object in the last column
    assert background[0] == pytest.approx(GROUND_DEPTH[1], rel=0.02)
    assert background[-1] == pytest.approx(GROUND_DEPTH[0], rel=0.02)
    assert np.all(np.diff(background) < 0)  # farther up the image
    rows = (np.arange(64) + 0.5) / 64
    np.testing.assert_allclose(1 / background, 1 / GROUND_DEPTH[1] + (1 / GROUND_DEPTH[0] - 1 / GROUND_DEPTH[1])
                               * rows, rtol=1e-5)  # inverse depth linear in the row: a plane in perspective
    objects = [float(np.unique(depth[inst == m])[0]) for m in (1, 2, 3)]
    assert all(len(np.unique(depth[inst == m])) == 1 for m in (1, 2, 3))
    assert objects[0] > objects[1] > objects[2] and OBJECT_DEPTH[0] <= objects[2] and objects[0] <= OBJECT_DEPTH[1]


def test_a_foggy_image_is_koschmieder_of_its_clear_image():
    image = render_fog("target_val", 3, beta=FOG_BETA)
    clear = render_fog("target_val", 3, beta=0.0)
    rng = np.random.default_rng([0, 2, 3, 2])  # the fog stream of (seed 0, target_val, index 3)
    depth = fog_depth(clear.instances, rng)
    airlight = 255.0 * rng.uniform(*AIRLIGHT)
    t = np.exp(-FOG_BETA * depth.astype(np.float64))
    direct = clear.image.astype(np.float64) * t[..., None] + airlight * (1 - t[..., None])
    assert np.abs(image.image.astype(np.float64) - direct).max() <= 1.0  # the clear image is rounded once
    assert np.array_equal(image.boxes, clear.boxes) and np.array_equal(image.labels, clear.labels)
    contrast = [float(x.image.astype(np.float32).std()) for x in (clear, image)]
    assert contrast[1] < 0.7 * contrast[0]


@pytest.mark.parametrize("split", ["target_train", "target_val"])
def test_beta_zero_is_the_clear_photo_like_image_exactly(split):
    clear = render_fog(split, 1, beta=0.0, seed=2, height=64, width=96)
    assert clear.image.shape == (64, 96, 3)
    source_like = render_fog("source", 1, seed=2, height=64, width=96)  # no fog on the source split
    assert np.array_equal(source_like.image, render("source", 1, seed=2, height=64, width=96).image)
    same = render_fog("target_train", 1, beta=0.0, seed=2, height=64, width=96, same_scenes=True)
    assert np.array_equal(same.image, source_like.image)  # the source image itself, bit for bit
    assert not np.array_equal(render_fog(split, 1, seed=2, height=64, width=96).image, clear.image)


def test_same_scenes_gives_the_source_boxes_and_val_keeps_its_own_scenes():
    for i in range(4):
        source = render("source", i)
        foggy = render_fog("target_train", i, same_scenes=True)
        assert np.array_equal(foggy.boxes, source.boxes) and np.array_equal(foggy.labels, source.labels)
        assert np.array_equal(foggy.instances, source.instances)
        own = render_fog("target_train", i)
        assert not np.array_equal(own.boxes, source.boxes)
        val = render_fog("target_val", i, same_scenes=True)
        assert np.array_equal(val.boxes, render_fog("target_val", i).boxes)
        assert not np.array_equal(val.boxes, source.boxes)


def test_rendering_is_deterministic_by_seed():
    a, b = render_fog("target_train", 5, seed=7), render_fog("target_train", 5, seed=7)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.boxes, b.boxes)
    c = render_fog("target_train", 5, seed=8)
    assert not np.array_equal(a.image, c.image)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        render_fog("target_val", 0, beta=-0.01)


def test_the_data_set_serves_the_foggy_benchmark():
    ds = build_det_dataset("synth_shapes_fog", root=None, split="target_train",
                           options={"num_images": 3, "beta": 0.01, "same_scenes": True, "height": 64, "width": 64})
    sample = ds[1]
    direct = render_fog("target_train", 1, beta=0.01, same_scenes=True, height=64, width=64)
    assert ds.ids == ["target_train_00000", "target_train_00001", "target_train_00002"]
    assert np.array_equal((sample["image"].numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8), direct.image)
    assert np.array_equal(sample["boxes"].numpy(), direct.boxes) and ds.class_names == synth_det.CLASS_NAMES
    for bad, message in (({"beta": -1}, "beta must be a number >= 0"), ({"same_scenes": "yes"}, "true or false"),
                         ({"betta": 0.02}, "has no option 'betta'")):
        with pytest.raises(DataError, match=message):
            build_det_dataset("synth_shapes_fog", root=None, split="target_val", options=bad)
    with pytest.raises(DataError, match="synth_shapes_fog split 'val' is unknown"):
        build_det_dataset("synth_shapes_fog", root=None, split="val", options={})
