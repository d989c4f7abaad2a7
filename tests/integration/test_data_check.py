"""``selftrain data check`` on a GTA5 -> Cityscapes recipe over tiny copies of the official layouts."""

from __future__ import annotations

import logging
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


@pytest.fixture(autouse=True)
def restore_logging():
    """The CLI configures the ``selftrain`` logger; leave it as it was for the tests that follow."""
    logger = logging.getLogger("selftrain")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


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
