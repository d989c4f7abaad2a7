"""Bad inputs through the CLI: ``labels summary|show``, ``priors show`` and ``data check`` end with one
``error:`` line on stderr and exit code 2, print no traceback and leave every file as it was.

The runs are made without training: the tiny recipe resolved into config.yaml, round files written
with PseudoLabelWriter (with that recipe, as the engine writes them) and a metrics.jsonl.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from conftest import TINY
from det_layouts import write_voc

from selftrain.cli import main
from selftrain.config import load_recipe, to_yaml
from selftrain.data.synth import CLASS_NAMES as STREET_CLASSES
from selftrain.priors import save_prior
from selftrain.store import PseudoLabelWriter, RoundMeta

REPO = Path(__file__).resolve().parents[2]
IDS = [f"target_train_{i:05d}" for i in range(12)]


pytestmark = pytest.mark.usefixtures("restore_logging")


def write_round(path: Path, r: int, recipe: str, *, num_classes: int = 10, names=STREET_CLASSES, seed: int = 0) -> None:
    rng = np.random.default_rng(seed + r)
    with PseudoLabelWriter(path, RoundMeta(task="segmentation", round=r, policy="cbst", portion=0.5,
                                           num_classes=num_classes, class_names=list(names), recipe=recipe)) as w:
        for image_id in IDS:
            labels = np.where(rng.random((32, 64)) < 0.3, 255, rng.integers(0, num_classes, (32, 64))).astype(np.uint8)
            w.add_segmentation(image_id, labels, rng.random((32, 64)).astype(np.float32))
        w.finish(thresholds=np.full(num_classes, 0.5, np.float32), selected_pixels=np.ones(num_classes, np.int64))


def make_run(folder: Path, overrides: list[str] = ()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(TINY.format(defaults=REPO / "recipes" / "defaults.yaml"))
    recipe = to_yaml(load_recipe(folder / "recipe.yaml", list(overrides)))
    run = folder / "run"
    (run / "pseudo").mkdir(parents=True)
    (run / "config.yaml").write_text(recipe)
    for r in (1, 2):
        write_round(run / "pseudo" / f"round_{r:03d}.h5", r, recipe)
    records = [{"round": r, "eval": {"miou": 10.0 + r, "iou": [10.0] * 10},
                "pseudo": {"thresholds": [0.5] * 10, "selected_pixels": [1] * 10}} for r in (0, 1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(rec) + "\n" for rec in records))
    return run


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("hostile"))


@pytest.fixture
def run(clean_run, tmp_path) -> Path:
    shutil.copytree(clean_run.parent, tmp_path / "copy")
    return tmp_path / "copy" / "run"


def hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(args: list, folder: Path, *words: str) -> str:
    """Run the CLI on a broken input: exit 2, one ``error:`` line naming ``words``, no file changed."""
    before = hashes(folder)
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr, result.stderr
    assert hashes(folder) == before
    return result.stderr


def h5_edit(name: str, **attrs) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        with h5py.File(run / "pseudo" / name, "r+") as f:
            for key, value in attrs.items():
                f.attrs[key] = value
    return edit


def copy_from_another_run(run: Path) -> None:
    other = make_run(run.parent.parent / "other", ["seed=7"])
    shutil.copy(other / "pseudo" / "round_002.h5", run / "pseudo" / "round_002.h5")
    shutil.rmtree(other.parent)


def eleven_classes(run: Path) -> None:
    names = [*STREET_CLASSES, "extra"]
    write_round(run / "pseudo" / "round_002.h5", 2, (run / "config.yaml").read_text(), num_classes=11, names=names)


def replace_text(rel: str, text: str) -> Callable[[Path], None]:
    return lambda run: (run / rel).write_text(text)


def metrics_line(k: int, text: str) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        lines[k] = text
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return edit


def truncate(rel: str) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        data = (run / rel).read_bytes()
        (run / rel).write_bytes(data[: len(data) // 3])
    return edit


SUMMARY = [  # (case, damage, words in the error)
    ("round-file-of-another-run", copy_from_another_run, "another recipe"),
    ("round-attribute-disagrees-with-name", lambda run: shutil.copy(run / "pseudo" / "round_001.h5",
                                                                    run / "pseudo" / "round_002.h5"), "round=1"),
    ("task-edited", h5_edit("round_001.h5", task="detection"), "task='detection'"),
    ("classes-disagree-with-config", eleven_classes, "num_classes=11"),
    ("class-names-edited", h5_edit("round_001.h5", class_names=["x"] * 10), "class_names="),
    ("num-classes-edited", h5_edit("round_002.h5", num_classes=4), "'class_names'"),
    ("round-attribute-text", h5_edit("round_001.h5", round="one"), "'round'"),
    ("zero-byte-round", replace_text("pseudo/round_001.h5", ""), "not an HDF5 file"),
    ("truncated-round", truncate("pseudo/round_002.h5"), "corrupt HDF5"),
    ("metrics-damaged-middle-line", metrics_line(1, '{"round": 1, "ev'), "metrics.jsonl line 2"),
    ("metrics-line-not-an-object", metrics_line(0, "[1, 2]"), "line 1 is damaged (not a JSON object)"),
    ("metrics-line-without-round", metrics_line(0, '{"eval": {"miou": 3}}'), "line 1 is damaged (no round number)"),
    ("metrics-wrong-threshold-count", metrics_line(1, json.dumps({"round": 1, "pseudo": {"thresholds": [0.5]}})),
     "round 1 is malformed"),
    ("config-not-yaml", replace_text("config.yaml", "name: [unclosed\n"), "config.yaml"),
    ("config-binary", lambda run: (run / "config.yaml").write_bytes(b"\xff\xfe\x00name"), "config.yaml"),
]


@pytest.mark.parametrize("case, damage, words", SUMMARY, ids=[c[0] for c in SUMMARY])
def test_labels_summary_refuses(run, case, damage, words):
    damage(run)
    refused(["labels", "summary", run], run.parent, words)


def test_labels_summary_reads_the_clean_run_and_a_torn_last_line(run, caplog):
    result = CliRunner().invoke(main, ["labels", "summary", str(run), "--json"])
    assert result.exit_code == 0, result.stderr
    assert [row["round"] for row in json.loads(result.stdout)["rounds"]] == [0, 1, 2]
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"round": 3, "eval": {"mi')  # a kill while the record was written
    result = CliRunner().invoke(main, ["labels", "summary", str(run), "--json"])
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.output + result.stderr
    assert any("line 4 is cut short" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert [row["score"] for row in json.loads(result.stdout)["rounds"]] == [10.0, 11.0, 12.0]


def test_labels_summary_refuses_a_damaged_evaluation_file(run):
    shutil.rmtree(run / "pseudo")
    (run / "eval").mkdir()
    (run / "eval" / "round_000.json").write_text("{not json")
    refused(["labels", "summary", run], run.parent, "round_000.json")


SHOW = [
    ("zero-byte-round", replace_text("pseudo/round_001.h5", ""), "not an HDF5 file"),
    ("round-of-other-classes", eleven_classes, "num_classes=11"),
    ("labels-dataset-removed", lambda run: _delete(run / "pseudo" / "round_002.h5", "labels"), "'labels'"),
]


def _delete(path: Path, name: str) -> None:
    with h5py.File(path, "r+") as f:
        del f[name]


@pytest.mark.parametrize("case, damage, words", SHOW, ids=[c[0] for c in SHOW])
def test_labels_show_refuses(run, tmp_path, case, damage, words):
    damage(run)
    r = 1 if case == "zero-byte-round" else 2
    refused(["labels", "show", run, "--round", r, "--index", 0, "--out", run / "x.png"], run.parent, words)
    assert not (run / "x.png").exists()


def prior_folder(folder: Path) -> Path:
    priors = folder / "priors"
    priors.mkdir()
    save_prior(priors / "good.npz", np.full((3, 4, 5), 1 / 20, np.float32), class_names=["a", "b", "c"],
               source="test", command="test", ksize=3)
    return priors


def npz(name: str, array) -> Callable[[Path], Path]:
    def make(priors: Path) -> Path:
        with open(priors / name, "wb") as fh:
            np.savez(fh, prior=array)
        return priors / name
    return make


def raw(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(priors: Path) -> Path:
        (priors / name).write_bytes(data)
        return priors / name
    return make


def h5_prior(priors: Path) -> Path:
    with h5py.File(priors / "h5.npz", "w") as f:
        f["prior"] = np.ones((2, 3, 4))
    return priors / "h5.npz"


def manifest(text: str, target: str = "good.npz") -> Callable[[Path], Path]:
    def make(priors: Path) -> Path:
        (priors / "MANIFEST.yaml").write_text(text)
        return priors / target
    return make


def good_truncated(priors: Path) -> Path:
    data = (priors / "good.npz").read_bytes()
    (priors / "cut.npz").write_bytes(data[: len(data) // 2])
    return priors / "cut.npz"


def other_class_count(priors: Path) -> Path:
    entries = yaml.safe_load((priors / "MANIFEST.yaml").read_text())
    entries["good"]["classes"] = ["a", "b"]
    (priors / "MANIFEST.yaml").write_text(yaml.safe_dump(entries))
    return priors / "good.npz"


def edited_after_build(priors: Path) -> Path:
    with open(priors / "good.npz", "ab") as fh:
        fh.write(b"\0")
    return priors / "good.npz"


PRIORS = [
    ("zero-bytes", raw("empty.npz", b""), "empty"),
    ("text", raw("text.npz", b"prior = 1\n"), "not an .npz archive"),
    ("single-npy", lambda p: (np.save(p / "one.npy", np.ones((2, 3, 4))), (p / "one.npy").rename(p / "one.npz"))[1],
     ".npy array"),
    ("hdf5", h5_prior, "HDF5 file"),
    ("truncated", good_truncated, "unreadable"),
    ("no-prior-array", lambda p: (np.savez(p / "other.npz", weights=np.ones(3)), p / "other.npz")[1], "no 'prior'"),
    ("two-dimensional", npz("flat.npz", np.ones((4, 5))), "expected [C, H, W]"),
    ("no-classes", npz("none.npz", np.ones((0, 4, 5))), "expected [C, H, W]"),
    ("nan", npz("nan.npz", np.full((2, 4, 5), np.nan)), "NaN"),
    ("negative", npz("neg.npz", -np.ones((2, 4, 5))), "negative"),
    ("text-values", npz("str.npz", np.full((2, 4, 5), "x")), "real numbers"),
    ("all-zero-class", npz("zero.npz", np.concatenate([np.ones((1, 4, 5)), np.zeros((1, 4, 5))])), "class 1"),
    ("manifest-not-yaml", manifest("good: [unclosed\n"), "not valid YAML"),
    ("manifest-classes-disagree", other_class_count, "class names"),
    ("edited-after-build", edited_after_build, "sha256"),
]


@pytest.mark.parametrize("case, make, words", PRIORS, ids=[c[0] for c in PRIORS])
def test_priors_show_refuses(tmp_path, case, make, words):
    path = make(prior_folder(tmp_path))
    refused(["priors", "show", path, "--out", tmp_path / "out.png"], tmp_path, words)
    assert not (tmp_path / "out.png").exists()


def test_priors_show_draws_a_good_prior(tmp_path):
    prior_folder(tmp_path)
    result = CliRunner().invoke(main, ["priors", "show", str(tmp_path / "priors" / "good.npz"), "--out",
                                       str(tmp_path / "out.png")])
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "out.png").stat().st_size > 0


DET_RECIPE = """\
extends: {defaults}
name: voc_check
data:
  num_classes: 6
  source: {{name: voc, root: {root}, split: trainval}}
  target: {{name: voc, root: {root}, split: trainval}}
  target_val: null
"""


def test_data_check_refuses_a_box_outside_its_image(tmp_path):
    from det_layouts import Obj, voc_xml_text

    write_voc(tmp_path / "VOCdevkit")
    # the annotation claims a 64x48 image (the file is 32x24) and holds a box beyond the real image
    xml = voc_xml_text("000003.jpg", (48, 64), [Obj("dog", (20, 10, 60, 40))])
    (tmp_path / "VOCdevkit" / "VOC2007" / "Annotations" / "000003.xml").write_text(xml)
    recipe = tmp_path / "voc.yaml"
    recipe.write_text(DET_RECIPE.format(defaults=REPO / "recipes" / "det_defaults.yaml", root=tmp_path / "VOCdevkit"))
    refused(["data", "check", recipe], tmp_path, "data.source image 2 (000003)", "outside the 32x24 image")
