"""Run folders and checkpoints against careless use: metrics.jsonl read back whatever a kill left,
rebuilt one record per complete round; checkpoints of another model refused before loading; the
run lock; failed writes as one line naming the file."""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selftrain.checkpoint import (RunDir, WriteError, check_model, link_atomic, load_checkpoint, read_records,
                                  run_lock, save_checkpoint, save_state, writing)
from selftrain.errors import UserError

RECIPE = "task: segmentation\nmodel: {name: tiny_seg, options: {width: 8}}\ndata: {num_classes: 10}\n"
MODEL = {"conv.weight": torch.zeros(8, 3, 3, 3), "head.weight": torch.zeros(10, 8, 1, 1)}


def lines(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


# -- metrics.jsonl -------------------------------------------------------------------------------

def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text(lines({"round": 0}, {"round": 1, "eval": {"miou": 3.5}}) + '{"round": 2, "ev')
    with caplog.at_level(logging.WARNING):
        assert read_records(path) == [{"round": 0}, {"round": 1, "eval": {"miou": 3.5}}]
    assert "line 3 is cut short" in caplog.text


@pytest.mark.parametrize("tail", ["\0\0\0\0", "[1, 2]", '{"phase": "online"}'])
def test_a_last_line_that_is_no_record_is_dropped(tmp_path, tail):
    path = tmp_path / "metrics.jsonl"
    path.write_text(lines({"round": 0}, tail, ""))
    assert read_records(path) == [{"round": 0}]


def test_a_damaged_middle_line_is_one_error_naming_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(lines({"round": 0}, '{"round": 1, "ev', {"round": 2}))
    with pytest.raises(UserError, match=r"metrics.jsonl line 2 is damaged.*delete that line") as exc:
        read_records(path)
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)


def fake_run(root: Path, rounds: list[int], metrics: str | None) -> RunDir:
    """A run folder with round checkpoints (each carrying its record) and the given metrics.jsonl."""
    run = RunDir(root)
    root.mkdir(parents=True)
    run.config.write_text(RECIPE)
    for r in rounds:
        save_checkpoint(run.checkpoint(r), round_index=r, model=MODEL, recipe_yaml=RECIPE,
                        record=rec(r))
        link_atomic(run.checkpoint(r), run.last)
    if metrics is not None:
        run.metrics.write_text(metrics)
    return run


def rec(r: int) -> dict:
    return {"round": r, "eval": {"miou": 10.0 + r}}


def test_resume_keeps_one_line_per_complete_round(tmp_path):
    """Lines of a round without a checkpoint go (killed between the line and the checkpoint); a
    checkpointed round whose line is missing gets it back from its checkpoint."""
    run = fake_run(tmp_path / "run", [0, 1, 2], lines(rec(0), rec(2), rec(3), '{"round": 4'))
    with run.open(RECIPE, resume=True) as last:
        assert last == 2
    assert run.metrics.read_text() == lines(rec(0), rec(1), rec(2))


def test_resume_from_last_pt_alone(tmp_path):
    """The round files deleted to save space: last.pt's round is the one to continue after."""
    run = fake_run(tmp_path / "run", [0, 1], lines(rec(0), rec(1), rec(2)))
    for r in (0, 1):
        run.checkpoint(r).unlink()
    with run.open(RECIPE, resume=True) as last:
        assert last == 1
    assert run.metrics.read_text() == lines(rec(0), rec(1))
    assert run.round_state(1)["round"] == 1


def test_resume_points_last_pt_at_a_newer_round_file(tmp_path):
    """Killed after round 1's checkpoint and before last.pt followed it."""
    run = fake_run(tmp_path / "run", [0], lines(rec(0), rec(1)))
    save_checkpoint(run.checkpoint(1), round_index=1, model=MODEL, recipe_yaml=RECIPE, record=rec(1))
    with run.open(RECIPE, resume=True) as last:
        assert last == 1
    assert os.path.samefile(run.last, run.checkpoint(1))
    assert run.metrics.read_text() == lines(rec(0), rec(1))


def test_a_damaged_last_checkpoint_names_what_to_delete(tmp_path):
    run = fake_run(tmp_path / "run", [0, 1], lines(rec(0), rec(1)))
    with open(run.checkpoint(1), "r+b") as fh:  # last.pt is the same file
        fh.truncate(100)
    before = {p: p.read_bytes() for p in run.root.rglob("*") if p.is_file()}
    with pytest.raises(UserError) as exc:  # found before the folder is touched
        with run.open(RECIPE, resume=True):
            pass
    assert {p: p.read_bytes() for p in run.root.rglob("*") if p.is_file() and p.name != ".lock"} == {
        p: b for p, b in before.items() if p.name != ".lock"}
    assert str(exc.value) == (f"checkpoint {run.checkpoint(1)} is damaged and cannot be read; delete it and last.pt "
                              "and rerun with --resume to continue from round 0")


def test_a_damaged_last_pt_alone_names_what_to_delete(tmp_path):
    run = fake_run(tmp_path / "run", [0], lines(rec(0)))
    run.checkpoint(0).unlink()
    run.last.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(UserError) as exc:
        with run.open(RECIPE, resume=True):
            pass
    assert str(exc.value) == (f"checkpoint {run.last} is damaged and cannot be read; delete it and rerun with "
                              "--resume to start again from round 0")
    assert run.metrics.read_text() == lines(rec(0))


def test_a_fresh_start_clears_the_lines_of_a_run_that_checkpointed_nothing(tmp_path):
    run = fake_run(tmp_path / "run", [], lines(rec(0)))
    with run.open(RECIPE.replace("width: 8", "width: 16"), resume=False) as last:
        assert last is None
    assert run.metrics.read_text() == "" and "width: 16" in run.config.read_text()


def test_a_folder_that_is_no_run_is_refused_untouched(tmp_path):
    root = tmp_path / "mine"
    (root / "pseudo").mkdir(parents=True)
    for name in ("metrics.jsonl", "notes.tmp", "pseudo/a.tmp", ".x.tmp"):
        (root / name).write_text("mine")
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    with pytest.raises(UserError, match="holds no selftrain run"):
        with RunDir(root).open(RECIPE, resume=True):
            pass
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    assert all((root / name).read_text() == "mine" for name in ("metrics.jsonl", "notes.tmp", "pseudo/a.tmp"))


# -- checkpoints of another model ----------------------------------------------------------------

def test_another_model_in_the_stored_recipe_is_refused_naming_both():
    state = {"model": {"w": torch.zeros(3)}, "recipe": RECIPE.replace("tiny_seg", "deeplabv2").replace("10", "19")}
    with pytest.raises(UserError) as exc:
        check_model(state, "x.pt", recipe_yaml=RECIPE, expected=MODEL)
    assert "x.pt holds deeplabv2 (segmentation, 19 classes) but this recipe builds tiny_seg (segmentation, 10 classes)" \
        in str(exc.value)


def test_other_options_are_named_when_the_shapes_differ():
    state = {"model": {**MODEL, "conv.weight": torch.zeros(16, 3, 3, 3)}, "recipe": RECIPE.replace("8}", "16}")}
    with pytest.raises(UserError) as exc:
        check_model(state, "x.pt", recipe_yaml=RECIPE, expected=MODEL)
    message = str(exc.value)
    assert "conv.weight is [16, 3, 3, 3] there, [8, 3, 3, 3] here" in message
    assert "made with model.options {'width': 16}, this recipe has {'width': 8}" in message


@pytest.mark.parametrize("model,words", [
    ({"conv.weight": torch.zeros(8, 3, 3, 3)}, "it has no head.weight"),
    ({**MODEL, "extra.bias": torch.zeros(2)}, "it has extra.bias, which this model lacks"),
    ({**MODEL, "head.weight": "not a tensor"}, "head.weight is str there"),
])
def test_a_foreign_file_is_compared_by_names_and_shapes(model, words):
    with pytest.raises(UserError, match=words):
        check_model({"model": model}, "x.pt", recipe_yaml=RECIPE, expected=MODEL)


def test_a_fitting_checkpoint_passes():
    check_model({"model": dict(MODEL), "recipe": RECIPE.replace("8}", "8, pretrained: x}")}, "x.pt",
                recipe_yaml=RECIPE, expected=MODEL)


def test_a_truncated_checkpoint_is_one_line(tmp_path):
    path = tmp_path / "round_001.pt"
    save_state(path, {"model": MODEL})
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(UserError, match="cannot be read .* damaged"):
        load_checkpoint(path)


# -- the run lock --------------------------------------------------------------------------------

def test_the_lock_refuses_a_second_holder_naming_the_pid(tmp_path):
    root = tmp_path / "run"
    with run_lock(root):
        with pytest.raises(UserError) as exc:
            with run_lock(root):
                pass
        assert str(exc.value).startswith(f"run directory {root} is in use by process {os.getpid()};")
    with run_lock(root):  # released with the block
        pass


# -- failed writes -------------------------------------------------------------------------------

def _small_files() -> None:
    """In the child only: writes past 4 KiB fail with EFBIG, as on a full disk (SIGXFSZ ignored). The
    limit would also stop the test runner's own log once it passes 4 KiB, so it never applies here."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


WRITE = """
import sys, torch
from pathlib import Path
from selftrain.checkpoint import WriteError, save_state
path = Path(sys.argv[1])
try:
    save_state(path, {"model": {"w": torch.zeros(10_000)}})
except WriteError as exc:
    print(exc, exc.path == path, sep="\\n")
"""


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_loses_nothing(tmp_path):
    path = tmp_path / "checkpoints" / "round_001.pt"
    path.parent.mkdir()
    path.write_bytes(b"the old one")
    child = subprocess.run([sys.executable, "-c", WRITE, str(path)], capture_output=True, text=True, timeout=300,
                           preexec_fn=_small_files)
    message, same_path = child.stdout.splitlines()
    assert message.startswith(f"cannot write {path}: File too large;") and same_path == "True", child.stderr
    assert path.read_bytes() == b"the old one" and sorted(p.name for p in path.parent.iterdir()) == ["round_001.pt"]


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space"), PermissionError(errno.EACCES, "denied", "/x/y")])
def test_writing_names_the_path_of_any_os_error(exc):
    with pytest.raises(WriteError, match=f"cannot write /run/a.pt: {os.strerror(exc.errno)};"):
        with writing(Path("/run/a.pt")):
            raise exc


def test_writing_keeps_errors_that_are_not_about_writing():
    with pytest.raises(RuntimeError, match="shape"):
        with writing(Path("/run/a.pt")):
            raise RuntimeError("shape")
    image = OSError(errno.EACCES, "denied", "/data/images/a.png")  # an input, not the run folder
    with pytest.raises(OSError) as caught:
        with writing(Path("/run/pseudo/round_001.h5"), among_reads=True):
            raise image
    assert caught.value is image
    with pytest.raises(OSError, match="cannot identify"):
        with writing(Path("/run/pseudo/round_001.h5"), among_reads=True):
            raise OSError("cannot identify image file")  # no errno: a bad image
    with pytest.raises(WriteError, match="round_001.h5: No space left on device"):
        with writing(Path("/run/pseudo/round_001.h5"), among_reads=True):
            raise OSError(errno.ENOSPC, "Can't write data (file write failed: ...)")  # h5py's
