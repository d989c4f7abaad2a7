"""Overlay pixels and palettes: colours change exactly where labels change; ignored pixels are marked."""

from __future__ import annotations

import numpy as np

from selftrain.overlay import hatch_mask, overlay, palette_for, resize_labels


def test_palette_uses_cityscapes_colours_by_name_and_distinct_ones_otherwise():
    palette = palette_for(["road", "traffic_sign", "sign", "bicycle", "dog", "cat"])
    assert palette[0].tolist() == [128, 64, 128] and palette[1].tolist() == [220, 220, 0]
    assert palette[2].tolist() == [220, 220, 0] and palette[3].tolist() == [119, 11, 32]
    assert palette[4].tolist() != palette[5].tolist()


def test_overlay_changes_exactly_where_labels_change():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    palette = palette_for([f"c{i}" for i in range(5)])
    a = rng.integers(0, 5, (20, 30))
    a[:4] = 255
    b = a.copy()
    b[10:12, 5:9] = (a[10:12, 5:9] + 1) % 5
    b[0, :6] = 2  # ignored in a, labelled in b
    differ = np.any(overlay(image, a, palette, 255) != overlay(image, b, palette, 255), axis=-1)
    assert np.array_equal(differ, a != b)


def test_ignored_pixels_are_darkened_and_hatched():
    image = np.full((24, 24, 3), 200, dtype=np.uint8)
    labels = np.full((24, 24), 255)
    out = overlay(image, labels, palette_for(["a"]), 255)
    hatch = hatch_mask((24, 24))
    assert hatch.any() and (~hatch).any()
    assert (out[hatch] == 160).all() and (out[~hatch] == 90).all()


def test_resize_labels_nearest():
    labels = np.arange(4).reshape(2, 2)
    assert resize_labels(labels, (4, 4)).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
