"""Spatial priors (CBST §4.4) against a naive reference: python loops and an explicit 2-D kernel."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import yaml

from selftrain.errors import DataError
from selftrain.priors import (
    build_spatial_prior,
    load_prior,
    plot_prior,
    resize_prior,
    save_prior,
    scaled_kernel_size,
    verify_manifest,
)


def naive_prior(maps, num_classes, ksize, ignore_index=255):
    """Reference: loop counts, per-pixel frequency, 2-D Gaussian with mirrored border, normalise."""
    height, width = maps[0].shape
    counts = np.zeros((num_classes, height, width))
    valid = np.zeros((height, width))
    for m in maps:
        for y in range(height):
            for x in range(width):
                if m[y, x] != ignore_index:
                    counts[m[y, x], y, x] += 1
                    valid[y, x] += 1
    freq = counts / np.maximum(valid, 1)
    sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8
    r = ksize // 2
    d = np.arange(-r, r + 1)
    kernel = np.exp(-(d[:, None] ** 2 + d[None, :] ** 2) / (2 * sigma**2))
    kernel /= kernel.sum()
    out = np.zeros_like(freq)
    for c in range(num_classes):
        if counts[c].sum() == 0:
            out[c] = 1.0 / (height * width)
            continue
        padded = np.pad(freq[c], r, mode="symmetric")  # numpy 'symmetric' == scipy 'reflect'
        for y in range(height):
            for x in range(width):
                out[c, y, x] = (padded[y : y + 2 * r + 1, x : x + 2 * r + 1] * kernel).sum()
        out[c] /= out[c].sum()
    return out


def random_maps(seed, n=5, shape=(9, 11), classes_used=3, ignore_share=0.2):
    rng = np.random.default_rng(seed)
    maps = []
    for _ in range(n):
        m = rng.integers(0, classes_used, size=shape).astype(np.int64)
        m[rng.random(shape) < ignore_share] = 255
        maps.append(m)
    return maps


@pytest.mark.parametrize("ksize", [5, 4, 3])
def test_matches_naive_reference(ksize):
    maps = random_maps(0)
    got = build_spatial_prior(maps, 4, ksize)
    assert got.dtype == np.float32 and got.shape == (4, 9, 11)
    np.testing.assert_allclose(got, naive_prior(maps, 4, ksize), rtol=1e-5, atol=1e-8)


def test_each_class_sums_to_one_and_unseen_class_is_uniform():
    prior = build_spatial_prior(random_maps(1), 4, 5)  # class 3 never occurs
    np.testing.assert_allclose(prior.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    np.testing.assert_allclose(prior[3], 1.0 / (9 * 11), rtol=1e-6)
    assert prior[:3].std(axis=(1, 2)).min() > 0


def test_ignore_pixels_do_not_vote():
    # class 0 everywhere it is labelled: the frequency is 1 at every pixel, so the prior is flat.
    full = np.zeros((8, 10), np.int64)
    half = full.copy()
    half[4:] = 255
    prior = build_spatial_prior([full, half], 2, 5)
    np.testing.assert_allclose(prior[0], 1.0 / 80, rtol=1e-5)
    np.testing.assert_allclose(prior[1], 1.0 / 80, rtol=1e-6)  # never seen
    only_ignore = np.full((8, 10), 255)
    np.testing.assert_allclose(build_spatial_prior([full, only_ignore], 2, 5), prior, rtol=1e-6)


def test_ignore_index_is_configurable():
    m = np.array([[0, 1], [-1, 1]])
    prior = build_spatial_prior([m], 2, 1, ignore_index=-1)
    np.testing.assert_allclose(prior[0], [[1, 0], [0, 0]], atol=1e-7)
    np.testing.assert_allclose(prior[1], [[0, 0.5], [0, 0.5]], atol=1e-7)


def test_maps_of_another_size_are_resized_with_nearest_neighbour():
    small = random_maps(2, n=4, shape=(6, 8))
    big = [np.kron(m, np.ones((2, 2), dtype=np.int64)) for m in small]
    expected = naive_prior(small, 4, 3)
    mixed = [small[0], big[1], small[2], big[3]]  # size from the first map
    np.testing.assert_allclose(build_spatial_prior(mixed, 4, 3), expected, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(build_spatial_prior(big, 4, 3, size=(6, 8)), expected, rtol=1e-5, atol=1e-8)
    upsampled = build_spatial_prior(small, 4, 3, size=(12, 16))
    np.testing.assert_allclose(upsampled, naive_prior(big, 4, 3), rtol=1e-5, atol=1e-8)


def test_nearest_neighbour_samples_pixel_centres():
    # ksize=1 is the identity kernel, so the prior is the normalised frequency itself.
    m = np.arange(9).reshape(3, 3)
    prior = build_spatial_prior([m], 9, 1, size=(2, 2))
    for c, (y, x) in {0: (0, 0), 2: (0, 1), 6: (1, 0), 8: (1, 1)}.items():
        expected = np.zeros((2, 2))
        expected[y, x] = 1.0
        np.testing.assert_allclose(prior[c], expected, atol=1e-7)
    for c in (1, 3, 4, 5, 7):
        np.testing.assert_allclose(prior[c], 0.25)


def test_streams_from_a_generator_of_tensors():
    maps = random_maps(3)
    consumed = []

    def stream():
        for m in maps:
            consumed.append(1)
            yield torch.from_numpy(m)

    got = build_spatial_prior(stream(), 4, 5)
    assert len(consumed) == len(maps)
    np.testing.assert_allclose(got, naive_prior(maps, 4, 5), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("bad", [4, 7, -1])
def test_out_of_range_label_is_a_data_error(bad):
    maps = random_maps(4)
    maps[2][0, 0] = bad
    with pytest.raises(DataError, match=rf"label value {bad}\b.*num_classes=4"):
        build_spatial_prior(maps, 4, 3)


def test_bad_inputs_are_data_errors():
    with pytest.raises(DataError, match="no label maps"):
        build_spatial_prior([], 4, 3)
    with pytest.raises(DataError, match="dtype float"):
        build_spatial_prior([np.zeros((4, 4))], 4, 3)
    with pytest.raises(DataError, match="2-D"):
        build_spatial_prior([np.zeros((2, 4, 4), np.int64)], 4, 3)


def test_scaled_kernel_size():
    assert scaled_kernel_size(1024) == 71
    assert scaled_kernel_size(512) == 35
    assert scaled_kernel_size(256) == 17
    assert scaled_kernel_size(2048) == 141
    assert scaled_kernel_size(64) == 5
    assert scaled_kernel_size(16) == 3
    assert scaled_kernel_size(1) == 3
    assert scaled_kernel_size(512, ksize=35, reference_height=512) == 35
    sizes = [scaled_kernel_size(h) for h in range(1, 3000, 7)]
    assert all(k % 2 == 1 and k >= 3 for k in sizes) and sizes == sorted(sizes)
    with pytest.raises(ValueError):
        scaled_kernel_size(0)


def test_resize_prior_sums_to_one_and_log_is_finite():
    prior = build_spatial_prior(random_maps(5), 4, 3)
    prior[0, :4] = 0.0
    resized = resize_prior(prior, (5, 7))
    assert isinstance(resized, torch.Tensor) and resized.shape == (4, 5, 7) and resized.dtype == torch.float32
    torch.testing.assert_close(resized.sum(dim=(1, 2)), torch.ones(4))
    assert torch.isfinite(resized.log()).all()
    same = resize_prior(torch.from_numpy(prior[1:]), (9, 11))
    torch.testing.assert_close(same, torch.from_numpy(prior[1:] / prior[1:].sum(axis=(1, 2), keepdims=True)))


NAMES = ["road", "sky", "car", "bus"]


def saved(tmp_path, name="toy", seed=6):
    prior = build_spatial_prior(random_maps(seed), 4, 3)
    path = tmp_path / "priors" / f"{name}.npz"
    save_prior(path, prior, class_names=NAMES, source="toy maps", command="selftrain priors build --toy", ksize=3)
    return path, prior


def test_save_load_round_trip_with_manifest(tmp_path):
    path, prior = saved(tmp_path)
    other, _ = saved(tmp_path, "other", seed=7)
    np.testing.assert_array_equal(load_prior(path, num_classes=4), prior)
    manifest = yaml.safe_load((path.parent / "MANIFEST.yaml").read_text())
    assert set(manifest) == {"toy", "other"}
    entry = manifest["toy"]
    assert entry["name"] == "toy" and entry["file"] == "toy.npz" and entry["shape"] == [4, 9, 11]
    assert entry["classes"] == NAMES and entry["ksize"] == 3 and entry["source"] == "toy maps"
    assert entry["command"] == "selftrain priors build --toy" and "T" in entry["created"]
    assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    with np.load(path, allow_pickle=False) as data:
        assert list(data["class_names"]) == NAMES and int(data["ksize"]) == 3
    assert verify_manifest(path.parent) == []
    assert sorted(p.name for p in path.parent.iterdir()) == ["MANIFEST.yaml", "other.npz", "toy.npz"]


def test_tampered_prior_is_refused(tmp_path):
    path, prior = saved(tmp_path)
    with open(path, "wb") as fh:
        np.savez(fh, prior=prior * 2, class_names=np.asarray(NAMES), ksize=np.int64(3))
    with pytest.raises(DataError, match="sha256"):
        load_prior(path)
    problems = verify_manifest(path.parent)
    assert len(problems) == 1 and "toy.npz" in problems[0]


def test_class_count_mismatch_and_missing_file(tmp_path):
    path, _ = saved(tmp_path)
    with pytest.raises(DataError, match=r"4 classes but the model has 19"):
        load_prior(path, num_classes=19)
    with pytest.raises(DataError, match="selftrain priors build"):
        load_prior(tmp_path / "priors" / "absent.npz")


def test_verify_manifest_finds_missing_files_and_strays(tmp_path):
    path, prior = saved(tmp_path)
    np.savez(path.parent / "stray.npz", prior=prior)
    path.unlink()
    problems = verify_manifest(path.parent)
    assert any("toy.npz" in p and "missing" in p for p in problems)
    assert any("stray.npz" in p for p in problems)
    assert verify_manifest(tmp_path / "nowhere") != []


def test_plot_writes_a_png(tmp_path):
    prior = build_spatial_prior(random_maps(8), 4, 3)
    out = tmp_path / "plots" / "prior.png"
    plot_prior(prior, NAMES, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["prior.png"]


def test_save_with_a_damaged_manifest_writes_nothing(tmp_path):
    (tmp_path / "MANIFEST.yaml").write_text("a: [unclosed\n")
    with pytest.raises(DataError, match="not valid YAML"):
        save_prior(tmp_path / "p.npz", np.full((2, 3, 4), 1 / 12, np.float32), class_names=["a", "b"], source="s",
                   command="c", ksize=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["MANIFEST.yaml"]


@pytest.mark.parametrize("content, words", [
    (b"", "empty"), (b"\x93NUMPY\x01\x00", ".npy array"), (b"\x89HDF\r\n\x1a\n", "HDF5 file"),
    (b"PK\x03\x04broken", "unreadable"), (b"plain text", "not an .npz archive"),
])
def test_foreign_files_are_one_line_data_errors(tmp_path, content, words):
    (tmp_path / "p.npz").write_bytes(content)
    with pytest.raises(DataError, match=words) as info:
        load_prior(tmp_path / "p.npz")
    assert "\n" not in str(info.value) and "priors build" in str(info.value)


@pytest.mark.parametrize("array, words", [
    (np.full((2, 3, 4), np.inf), "NaN or infinite"), (np.full((2, 3, 4), -0.1), "negative"),
    (np.zeros((2, 3, 4)), "all-zero map for class 0"), (np.ones((2, 0, 4)), "expected"),
    (np.ones((2, 3, 4), bool), "real numbers"),
])
def test_values_that_cannot_be_a_prior_are_refused(tmp_path, array, words):
    with open(tmp_path / "p.npz", "wb") as fh:
        np.savez(fh, prior=array)
    with pytest.raises(DataError, match=words):
        load_prior(tmp_path / "p.npz")
    with pytest.raises(DataError, match="2 classes but the model has 3"):
        np.savez(tmp_path / "q.npz", prior=np.ones((2, 3, 4)))
        load_prior(tmp_path / "q.npz", num_classes=3)
