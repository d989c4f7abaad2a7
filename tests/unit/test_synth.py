"""The embedded street-scene benchmark: determinism, layout, imbalance, domain shift, files."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from PIL import Image
from scipy import ndimage

from selftrain.data import synth
from selftrain.data.synth import (BUILDING, CLASS_NAMES, LARGE_CLASSES, MEDIUM_CLASSES, NUM_CLASSES,
                                  RARE_CLASSES, ROAD, SIGN, SKY, SPLITS, render, write_benchmark)

N_STATS = 50  # images per split for share and colour statistics (64x128: ~0.5 s per split)
COLLISION_MARGIN = 40.0  # RGB distance; a prototype with a closer pair collapsed CBST's rare classes


def _class_stats(split: str, n: int = N_STATS) -> tuple[np.ndarray, np.ndarray]:
    """Pixel share [10] and mean RGB colour [10, 3] of every class over ``n`` images."""
    counts, sums = np.zeros(NUM_CLASSES), np.zeros((NUM_CLASSES, 3))
    for i in range(n):
        image, label = render(split, i)
        flat, pixels = label.ravel(), image.reshape(-1, 3).astype(np.float64)
        counts += np.bincount(flat, minlength=NUM_CLASSES)
        for c in range(3):
            sums[:, c] += np.bincount(flat, weights=pixels[:, c], minlength=NUM_CLASSES)
    return counts / counts.sum(), sums / np.maximum(counts, 1)[:, None]


@pytest.fixture(scope="module")
def source_stats():
    return _class_stats("source")


@pytest.fixture(scope="module")
def target_stats():
    return _class_stats("target_train")


def test_public_tables_are_consistent():
    assert len(CLASS_NAMES) == NUM_CLASSES == 10
    assert CLASS_NAMES[ROAD] == "road" and CLASS_NAMES[SKY] == "sky" and CLASS_NAMES[SIGN] == "traffic_sign"
    assert synth.PALETTE.shape == (NUM_CLASSES, 3) and synth.PALETTE.dtype == np.uint8
    assert SPLITS == ("source", "target_train", "target_val")
    assert sorted(LARGE_CLASSES + MEDIUM_CLASSES + RARE_CLASSES) == list(range(NUM_CLASSES))


@pytest.mark.parametrize("split", SPLITS)
def test_shapes_dtypes_and_label_range(split):
    image, label = render(split, 7)
    assert image.shape == (64, 128, 3) and image.dtype == np.uint8
    assert label.shape == (64, 128) and label.dtype == np.uint8
    assert label.max() < NUM_CLASSES


def test_render_is_deterministic_and_streams_differ():
    a_img, a_lab = render("target_train", 3, seed=5)
    b_img, b_lab = render("target_train", 3, seed=5)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    for other in (render("target_train", 3, seed=6), render("target_train", 4, seed=5),
                  render("target_val", 3, seed=5), render("source", 3, seed=5)):
        assert not np.array_equal(a_lab, other[1])


def test_an_image_does_not_depend_on_rendering_others_first():
    alone = render("source", 11)
    for i in range(3):
        render("source", i)
    np.testing.assert_array_equal(alone[0], render("source", 11)[0])


def test_every_class_appears_and_imbalance_order_holds(source_stats, target_stats):
    for share, _ in (source_stats, target_stats):
        assert (share > 0).all(), dict(zip(CLASS_NAMES, share))
        large, medium, rare = (share[list(group)] for group in (LARGE_CLASSES, MEDIUM_CLASSES, RARE_CLASSES))
        assert large.min() > medium.max() > medium.min() > rare.max()
        assert 0.25 < share[ROAD] < 0.36 and rare.max() < 0.015


def test_layout_sky_on_top_road_at_bottom():
    top, bottom = np.zeros(NUM_CLASSES), np.zeros(NUM_CLASSES)
    for i in range(20):
        label = render("target_val", i)[1]
        q = label.shape[0] // 4
        top += np.bincount(label[:q].ravel(), minlength=NUM_CLASSES)
        bottom += np.bincount(label[-q:].ravel(), minlength=NUM_CLASSES)
    top, bottom = top / top.sum(), bottom / bottom.sum()
    assert top[SKY] > 0.25 and bottom[SKY] == 0
    assert bottom[ROAD] > 0.5 and top[ROAD] == 0
    assert top[BUILDING] > bottom[BUILDING]


def test_no_target_class_takes_a_rare_class_source_colour(source_stats, target_stats):
    """Big classes may resemble each other across domains (road looks like sidewalk); what breaks
    class-balanced self-training is a target class the source model calls a rare class."""
    src, tgt = source_stats[1], target_stats[1]
    dist = np.linalg.norm(tgt[:, None, :] - src[None, :, :], axis=-1)  # [target class, source class]
    np.fill_diagonal(dist, np.inf)
    rare = list(RARE_CLASSES)
    for c, d in [(c, d) for c in range(NUM_CLASSES) for d in range(NUM_CLASSES) if c in rare or d in rare]:
        assert dist[c, d] > COLLISION_MARGIN, (
            f"target {CLASS_NAMES[c]} {tgt[c].round()} is {dist[c, d]:.0f} from source {CLASS_NAMES[d]} {src[d].round()}")


def test_dominant_colours_never_collide_with_rare_classes_across_domains():
    """Main-part colour of each target class vs each rare class's source one and vice versa
    (catches a target class painted in e.g. the source bike frame colour, which means can hide)."""
    src, tgt = synth.SOURCE_STYLE.colours[:, 0], synth.TARGET_STYLE.colours[:, 0].copy()
    rare = list(RARE_CLASSES)
    for zenith_or_horizon in synth.TARGET_STYLE.sky:
        tgt[SKY] = zenith_or_horizon
        dist = np.linalg.norm(tgt[:, None, :] - src[None, :, :], axis=-1)
        np.fill_diagonal(dist, np.inf)
        assert min(dist[:, rare].min(), dist[rare, :].min()) > 1.5 * COLLISION_MARGIN


def test_target_pixels_of_big_classes_rarely_look_like_a_rare_source_class():
    """Colour bins (16 levels per channel) are owned by the source class most likely to produce
    them; few target pixels of a large or medium class may fall into a rare class's bins."""
    def pixels(split):
        pairs = [render(split, i) for i in range(30)]
        bins = np.concatenate([(img.reshape(-1, 3) // 16).astype(np.int64) @ (256, 16, 1) for img, _ in pairs])
        return bins, np.concatenate([lab.ravel() for _, lab in pairs])
    src_bins, src_labels = pixels("source")
    hist = np.zeros((4096, NUM_CLASSES))
    np.add.at(hist, (src_bins, src_labels), 1.0)
    likelihood = hist / hist.sum(0, keepdims=True)  # p(bin | class): rare classes own their colours too
    owner = np.where(hist.sum(1) > 0, likelihood.argmax(1), -1)
    tgt_bins, tgt_labels = pixels("target_train")
    for c in LARGE_CLASSES + MEDIUM_CLASSES:  # thin rare objects blur into their neighbours
        owners = owner[tgt_bins[tgt_labels == c]]
        stolen = np.mean(np.isin(owners, RARE_CLASSES))
        assert stolen < (0.05 if c in LARGE_CLASSES else 0.1), (CLASS_NAMES[c], stolen, np.bincount(owners[owners >= 0], minlength=NUM_CLASSES))


def test_big_classes_shift_strongly_rare_classes_weakly(source_stats, target_stats):
    shift = np.linalg.norm(target_stats[1] - source_stats[1], axis=-1)
    big = shift[[ROAD, BUILDING, SKY]]
    assert big.min() > 50, dict(zip(CLASS_NAMES, shift.round()))
    assert shift[list(RARE_CLASSES)].max() < big.min()  # class-dependent: some classes transfer easily


def test_target_road_fades_into_haze_towards_the_horizon():
    """Far road (its top rows, next to the horizon) is much brighter than near road in the target only."""
    def far_minus_near(split):
        gaps = []
        for i in range(10):
            image, label = render(split, i)
            rows = np.flatnonzero((label == ROAD).any(1))
            brightness = np.where(label == ROAD, image.mean(-1), np.nan)
            gaps.append(np.nanmean(brightness[rows[0]:rows[0] + 3]) - np.nanmean(brightness[-8:]))
        return np.mean(gaps)
    assert far_minus_near("target_val") > 25
    assert abs(far_minus_near("source")) < 25


@pytest.mark.parametrize("size", [(128, 256), (32, 64)])
def test_other_sizes_render_and_label_layouts_scale(size):
    h, w = size
    image, label = render("source", 2, height=h, width=w)
    assert image.shape == (h, w, 3) and label.shape == (h, w)
    ref = render("source", 2)[1]
    if h > 64:
        agree = np.mean(label[1::2, 1::2] == ref)
    else:
        agree = np.mean(label == ref[::2, ::2])
    assert agree > 0.9
    share = np.bincount(label.ravel(), minlength=NUM_CLASSES) / label.size
    ref_share = np.bincount(ref.ravel(), minlength=NUM_CLASSES) / ref.size
    np.testing.assert_allclose(share[list(LARGE_CLASSES)], ref_share[list(LARGE_CLASSES)], atol=0.03)


def test_rare_objects_are_large_enough_to_learn():
    """Signs at least 2 px half-width and bikes at most ~0.3 image height at 64x128."""
    sign_widths, bike_heights = [], []
    for i in range(60):
        label = render("source", i)[1]
        for cls, store, axis in ((SIGN, sign_widths, 1), (synth.BICYCLE, bike_heights, 0)):
            comps, _ = ndimage.label(label == cls, structure=np.ones((3, 3)))
            store += [sl[axis].stop - sl[axis].start for sl in ndimage.find_objects(comps)]
    assert np.median(sign_widths) >= 5  # fragments behind occluders may be narrower
    assert max(bike_heights) <= 0.32 * 64 and max(bike_heights) >= 0.2 * 64


def test_write_benchmark_round_trip(tmp_path):
    out = write_benchmark(tmp_path / "bench", seed=3, num_source=2, num_target_train=1,
                          num_target_val=1, height=32, width=64)
    meta = yaml.safe_load((out / "benchmark.yaml").read_text())
    assert meta["seed"] == 3 and (meta["height"], meta["width"]) == (32, 64)
    assert meta["counts"] == {"source": 2, "target_train": 1, "target_val": 1}
    assert meta["class_names"] == list(CLASS_NAMES)
    for split, index in (("source", 0), ("source", 1), ("target_train", 0), ("target_val", 0)):
        name = f"{split}_{index:05d}.png"
        image, label = Image.open(out / split / "images" / name), Image.open(out / split / "labels" / name)
        assert image.mode == "RGB" and label.mode == "L"
        ref_image, ref_label = render(split, index, seed=3, height=32, width=64)
        np.testing.assert_array_equal(np.asarray(image), ref_image)
        np.testing.assert_array_equal(np.asarray(label), ref_label)
    assert not [p for p in out.rglob(".*")]  # no temporary files left behind
    assert len(list(out.rglob("*.png"))) == 8


@pytest.mark.parametrize("kwargs", [{"split": "target"}, {"split": "train"}])
def test_bad_split_names_the_valid_ones(kwargs):
    with pytest.raises(ValueError, match="source, target_train, target_val"):
        render(kwargs["split"], 0)
    with pytest.raises(ValueError, match=repr(kwargs["split"])):
        render(kwargs["split"], 1, height=32, width=64)


@pytest.mark.parametrize("size", [(8, 128), (64, 0), (64.0, 128), (64, "128")])
def test_bad_size_raises(size):
    with pytest.raises(ValueError, match=">= 16"):
        render("source", 0, height=size[0], width=size[1])


def test_bad_benchmark_arguments_raise_before_writing(tmp_path):
    with pytest.raises(ValueError, match="num_target_val"):
        write_benchmark(tmp_path / "b", num_source=1, num_target_train=1, num_target_val=-1)
    with pytest.raises(ValueError, match="height"):
        write_benchmark(tmp_path / "b", height=4)
    assert not (tmp_path / "b").exists()
