"""``selftrain data check`` on a GTA5 -> Cityscapes recipe over tiny copies of the official layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from cityscapesscripts.helpers.labels import labels as CS_LABELS
from layouts import write_cityscapes, write_gta5

from selftrain.cli import main
from selftrain.config import load_recipe
from selftrain.data.check import check_data, format_report

REPO = Path(__file__).resolve().parents[2]
RECIPE = """\
extends: {defaults}
name: check
data:
  num_classes: 19
  class_names: null
  source: {{name: gta5, root: {gta}}}
  target: {{name: cityscapes, root: {cs}, split: train}}
  target_val: {{name: cityscapes, root: {cs}, split: val}}
"""
CS_TRAIN_ID = {lab.id: lab.trainId for lab in CS_LABELS if lab.id >= 0 and 0 <= lab.trainId < 19}


def expected_counts(raw_labels: list[np.ndarray]) -> np.ndarray:
    """Pixels per train id, counted through the official table, independent of the code under test."""
    counts = np.zeros(19, dtype=np.int64)
    for raw in raw_labels:
        for label_id, train_id in CS_TRAIN_ID.items():
            counts[train_id] += int((raw == label_id).sum())
    return counts


@pytest.fixture
def fixtures(tmp_path):
    gta = write_gta5(tmp_path / "gta5", n=4, mismatched=1)
    cs = write_cityscapes(tmp_path / "cityscapes", splits={"train": 3, "val": 2}, foggy=False)
    recipe = tmp_path / "check.yaml"
    recipe.write_text(RECIPE.format(defaults=REPO / "recipes" / "defaults.yaml", gta=gta.root, cs=cs.root))
    return recipe, gta, cs


pytestmark = pytest.mark.usefixtures("restore_logging")


def invoke(*args: str):
    return CliRunner().invoke(main, ["data", "check", *args], catch_exceptions=False)


def test_report_counts_every_split(fixtures):
    recipe, gta, cs = fixtures
    report = check_data(load_recipe(recipe))
    source, target, val = report.splits
    assert [s.role for s in report.splits] == ["data.source", "data.target", "data.target_val"]
    assert (source.images, target.images, val.images) == (3, 3, 2)  # the mismatched GTA5 pair is skipped
    np.testing.assert_array_equal(source.counts, expected_counts([gta.labels[i] for i in gta.ids[""]]))
    np.testing.assert_array_equal(target.counts, expected_counts([cs.labels[i] for i in cs.ids["train"]]))
    np.testing.assert_array_equal(val.counts, expected_counts([cs.labels[i] for i in cs.ids["val"]]))
    assert val.ignored == 2 * 32 * 64 - val.counts.sum()
    assert report.class_names[0] == "road" and len(report.class_names) == 19
    assert val.shares.sum() == pytest.approx(1.0)
    limited = check_data(load_recipe(recipe), limit=1).splits[2]
    assert limited.labelled == 1 and limited.images == 2
    np.testing.assert_array_equal(limited.counts, expected_counts([cs.labels[cs.ids["val"][0]]]))


def test_cli_prints_the_tables(fixtures):
    recipe, _, _ = fixtures
    result = invoke(str(recipe), "--limit", "2")
    assert result.exit_code == 0, result.output
    assert "skipping 1 image/label pairs whose sizes differ: 00004" in result.output
    report = check_data(load_recipe(recipe), limit=2)
    assert format_report(report) in result.output
    rows = {line.split()[0]: line.split() for line in result.output.splitlines() if line.startswith("data.")}
    assert rows["data.source"][1:4] == ["gta5", "3", "2"] and rows["data.target_val"][1:4] == ["cityscapes", "2", "2"]
    road = next(line for line in result.output.splitlines() if line.startswith("road "))
    assert float(road.split()[1]) == pytest.approx(100 * report.splits[0].shares[0], abs=0.01)


def test_cli_set_overrides_and_missing_path(fixtures, tmp_path):
    recipe, _, _ = fixtures
    result = invoke(str(recipe), "--set", f"data.source.root={tmp_path / 'nowhere'}")
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith(f"error: data path {tmp_path / 'nowhere'} does not exist")


def test_cli_missing_label_names_the_image(fixtures):
    recipe, _, cs = fixtures
    city, stem = cs.ids["val"][1].split("/")
    (cs.root / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png").unlink()
    result = invoke(str(recipe))
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert f"{stem}_leftImg8bit.png" in result.stderr and "with_labels: false" in result.stderr


# --------------------------------------------------------------------------- detection recipes
VOC_RECIPE = """\
extends: {defaults}
name: voc_check
data:
  num_classes: 6
  source: {{name: voc, root: {root}, split: trainval}}
  target: {{name: voc, root: {root}, split: trainval}}
  target_val: {{name: voc, root: {root}, split: trainval}}
"""


@pytest.fixture
def voc_recipe(tmp_path):
    from det_layouts import write_voc

    written = write_voc(tmp_path / "VOCdevkit")
    recipe = tmp_path / "voc.yaml"
    recipe.write_text(VOC_RECIPE.format(defaults=REPO / "recipes" / "det_defaults.yaml", root=tmp_path / "VOCdevkit"))
    return recipe, written


def test_detection_recipe_counts_boxes_per_class(voc_recipe):
    recipe, written = voc_recipe
    cfg = load_recipe(recipe)
    names = cfg.data.class_names
    expected = np.zeros(len(names), np.int64)
    for objects in written.values():  # cow is a VOC class outside the recipe's six: skipped
        for obj in objects:
            if obj.name in names:
                expected[names.index(obj.name)] += 1
    report = check_data(cfg)
    assert [s.unit for s in report.splits] == ["boxes"] * 3
    for split in report.splits:
        assert (split.images, split.labelled, split.ignored) == (3, 3, 1)  # one difficult car
        np.testing.assert_array_equal(split.counts, expected)
    result = invoke(str(recipe))
    assert result.exit_code == 0, result.output
    assert "class (% of labelled boxes)" in result.output and "difficult" in result.output
    car = next(line for line in result.output.splitlines() if line.startswith("car "))
    assert float(car.split()[1]) == pytest.approx(100 * expected[names.index("car")] / expected.sum(), abs=0.01)


def test_builtin_detection_recipe_passes():
    from selftrain.catalog import resolve_recipe
    from selftrain.data import build_split

    cfg = load_recipe(resolve_recipe("det_st"))
    report = check_data(cfg, limit=20)
    source = build_split(cfg.data.source, cfg, with_labels=True)
    labels = np.concatenate([source.ground_truth(i)["labels"].numpy() for i in range(20)])
    np.testing.assert_array_equal(report.splits[0].counts, np.bincount(labels - 1, minlength=6))
    assert invoke("det_st", "--limit", "5").exit_code == 0


def test_broken_detection_data_is_one_line(voc_recipe):
    from det_layouts import Obj, voc_xml_text

    recipe, _ = voc_recipe
    words = "reaches outside the 32x24 image"
    xml = voc_xml_text("000003.jpg", (48, 64), [Obj("dog", (20, 10, 60, 40))])  # claims 64x48, the image is 32x24
    (recipe.parent / "VOCdevkit" / "VOC2007" / "Annotations" / "000003.xml").write_text(xml)
    result = CliRunner().invoke(main, ["data", "check", str(recipe)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert result.stderr.startswith("error: box 0") and words in result.stderr and "000003" in result.stderr


def test_check_boxes_refuses_labels_and_coordinates():
    from selftrain.data.check import check_boxes
    from selftrain.errors import DataError

    good = {"boxes": np.array([[0, 0, 4, 4], [1, 2, 8, 6]], np.float32), "labels": np.array([1, 3])}
    np.testing.assert_array_equal(check_boxes(good, (6, 8), 3, "img"), [1, 3])
    bad = [({"labels": np.array([0, 3])}, "label outside 1..3"), ({"labels": np.array([1, 4])}, "label outside 1..3"),
           ({"boxes": np.array([[0, 0, np.nan, 4], [1, 2, 8, 6]])}, "not a number"),
           ({"boxes": np.array([[-1, 0, 4, 4], [1, 2, 8, 6]])}, "outside the 8x6 image"),
           ({"boxes": np.array([[0, 0, 4, 4], [3, 2, 3, 6]])}, "has no area"),
           ({"labels": np.array([1])}, "2 boxes but 1 labels")]
    for change, words in bad:
        with pytest.raises(DataError, match=words):
            check_boxes({**good, **change}, (6, 8), 3, "img")
