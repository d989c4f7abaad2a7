"""Run folders used carelessly, through the CLI: a second process on a live run, an --out that is no
run, a run that failed before its first checkpoint, a damaged metrics.jsonl or checkpoint, a
checkpoint of another model, a disk that fills up. Each is one line and exit code 2, loses nothing,
and the fixed run (or the resumed one) ends as an uninterrupted one would."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import REPO
from selftrain.cli import main

ONE_ROUND = ["--set", "rounds.count=1"]
ENV = {**os.environ, "SELFTRAIN_QUIET": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"),
                                                                           os.environ.get("PYTHONPATH", "")])}


def run_cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def one_line_error(code: int, output: str) -> str:
    assert code == 2 and len(output.strip().splitlines()) == 1 and "Traceback" not in output, output
    return output.strip()


def listing(root: Path) -> dict[str, int]:
    """Every file under ``root`` (hidden ones too) with its size."""
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def full_run(tiny_recipe, tmp_path) -> Path:
    """The tiny recipe's uninterrupted run, rounds 0 and 1."""
    out = tmp_path / "full"
    code, text = run_cli("run", tiny_recipe, "--out", out, "--quiet", *ONE_ROUND)
    assert code == 0, text
    return out


def assert_same_result(full: Path, part: Path) -> None:
    assert (part / "metrics.jsonl").read_text() == (full / "metrics.jsonl").read_text()
    a = torch.load(full / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(part / "checkpoints" / "last.pt", weights_only=False)
    assert a["round"] == b["round"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not [p for p in part.rglob("*") if p.name.endswith(".tmp")]


# -- one process per run folder ------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_process_on_a_live_run_is_refused_and_the_first_finishes(tiny_recipe, tmp_path, full_run):
    """The first run is held while it writes round 1's pseudo-labels (its scratch files on disk)."""
    out = tmp_path / "live"
    args = [sys.executable, str(REPO / "tests" / "killpoint.py"), "hold-store", "1", "run", str(tiny_recipe),
            "--out", str(out), "--quiet", *ONE_ROUND]
    first = subprocess.Popen(args, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        assert first.stdout.readline().strip() == "held", first.stderr.read()
        scratch = listing(out)
        assert any(name.startswith("pseudo/") and name.endswith(".tmp") for name in scratch)
        for extra in (["--resume"], []):
            message = one_line_error(*run_cli("run", tiny_recipe, "--out", out, "--quiet", *ONE_ROUND, *extra))
            assert message.startswith(f"error: run directory {out} is in use by process {first.pid};")
        assert listing(out) == scratch
        first.stdin.write("\n")
        first.stdin.flush()
        assert first.wait(timeout=300) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGKILL)
            first.wait()
        for pipe in (first.stdin, first.stdout, first.stderr):
            pipe.close()
    assert_same_result(full_run, out)


# -- what --out points at ------------------------------------------------------------------------

def test_a_folder_that_is_no_run_is_refused_untouched(tiny_recipe, tmp_path):
    out = tmp_path / "notes"
    (out / "checkpoints").mkdir(parents=True)
    for name in ("metrics.jsonl", "draft.tmp", "checkpoints/model.pt.tmp", ".hidden.tmp"):
        (out / name).write_text("mine\n")
    before = listing(out)
    for extra in ([], ["--resume"]):
        message = one_line_error(*run_cli("run", tiny_recipe, "--out", out, *extra))
        assert f"--out {out} is a folder that holds no selftrain run" in message
    assert listing(out) == before and (out / "metrics.jsonl").read_text() == "mine\n"


def write_folder(root: Path, corrupt: bool) -> Path:
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(3):
        Image.fromarray(np.full((16, 32, 3), 40 * i, np.uint8)).save(root / "images" / f"im{i}.png")
        Image.fromarray(np.full((16, 32), 1, np.uint8)).save(root / "labels" / f"im{i}.png")
    if corrupt:
        (root / "images" / "im1.png").write_bytes(b"not a png")
    return root


@pytest.mark.parametrize("rerun", [[], ["--resume"]])
def test_a_run_that_failed_before_its_first_checkpoint_does_not_block_the_fixed_one(tiny_recipe, tmp_path, rerun):
    """The corrupt image is found at the first read, after the run folder was made; the fixed rerun
    (here with another data root, so another recipe) needs nothing deleted, with or without --resume."""
    out = tmp_path / "run"
    common = ["run", tiny_recipe, "--out", out, "--quiet", "--set", "rounds.count=0", "--set", "data.target_val=null"]
    bad = write_folder(tmp_path / "bad", corrupt=True)
    message = one_line_error(*run_cli(*common, "--set", f"data.source={{name: folder, root: {bad}}}"))
    assert "cannot read image" in message and (out / "config.yaml").is_file()
    good = write_folder(tmp_path / "good", corrupt=False)
    code, text = run_cli(*common, "--set", f"data.source={{name: folder, root: {good}}}", *rerun)
    assert code == 0, text
    assert str(good) in (out / "config.yaml").read_text() and (out / "checkpoints" / "round_000.pt").is_file()
    assert [r["round"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [0]


# -- metrics.jsonl -------------------------------------------------------------------------------

def cut_after_round_0(full: Path, part: Path) -> None:
    """``part`` = ``full`` killed while writing round 1's metrics line (no round 1 checkpoint yet)."""
    shutil.copytree(full, part)
    (part / "checkpoints" / "round_001.pt").unlink()
    shutil.copyfile(part / "checkpoints" / "round_000.pt", part / "checkpoints" / "last.pt")
    text = (part / "metrics.jsonl").read_text()
    (part / "metrics.jsonl").write_text(text[: len(text.splitlines()[0]) + 40])


def test_a_torn_last_line_is_dropped_and_its_round_redone(tiny_recipe, tmp_path, full_run):
    part = tmp_path / "part"
    cut_after_round_0(full_run, part)
    code, text = run_cli("run", tiny_recipe, "--out", part, "--resume", *ONE_ROUND)
    assert code == 0, text
    assert "line 2 is cut short" in text
    assert_same_result(full_run, part)


def test_a_lost_metrics_file_comes_back_from_the_checkpoints(tiny_recipe, tmp_path, full_run):
    part = tmp_path / "part"
    shutil.copytree(full_run, part)
    (part / "metrics.jsonl").unlink()
    code, text = run_cli("run", tiny_recipe, "--out", part, "--resume", "--quiet", *ONE_ROUND)
    assert code == 0, text
    assert_same_result(full_run, part)


def test_a_damaged_middle_line_is_one_line_naming_it(tiny_recipe, tmp_path, full_run):
    part = tmp_path / "part"
    shutil.copytree(full_run, part)
    first, second = (part / "metrics.jsonl").read_text().splitlines()
    (part / "metrics.jsonl").write_text(first[:30] + "\n" + second + "\n")
    before = listing(part)
    message = one_line_error(*run_cli("run", tiny_recipe, "--out", part, "--resume", *ONE_ROUND))
    assert f"{part / 'metrics.jsonl'} line 1 is damaged" in message
    assert listing(part) == before


# -- checkpoints ---------------------------------------------------------------------------------

def test_a_damaged_last_checkpoint_names_the_fix_that_works(tiny_recipe, tmp_path, full_run):
    part = tmp_path / "part"
    shutil.copytree(full_run, part)  # copies last.pt apart from round_001.pt: damage both
    for name in ("round_001.pt", "last.pt"):
        with open(part / "checkpoints" / name, "r+b") as fh:
            fh.truncate(1000)
    message = one_line_error(*run_cli("run", tiny_recipe, "--out", part, "--resume", *ONE_ROUND))
    assert message == (f"error: checkpoint {part / 'checkpoints' / 'round_001.pt'} is damaged and cannot be read; "
                       "delete it and rerun with --resume to continue from round 0")
    (part / "checkpoints" / "round_001.pt").unlink()  # the resumed run points last.pt at round 0's file
    code, text = run_cli("run", tiny_recipe, "--out", part, "--resume", "--quiet", *ONE_ROUND)
    assert code == 0, text
    assert_same_result(full_run, part)


def test_checkpoints_of_another_model_are_refused_before_loading(tiny_recipe, det_tiny_recipe, tmp_path, full_run):
    ckpt = full_run / "checkpoints" / "round_000.pt"
    message = one_line_error(*run_cli("evaluate", tiny_recipe, "--checkpoint", ckpt, "--set", "model.options.width=16"))
    assert f"checkpoint {ckpt} does not fit tiny_seg (segmentation, 10 classes)" in message
    assert "made with model.options {'width': 8}, this recipe has {'width': 16}" in message
    message = one_line_error(*run_cli("evaluate", det_tiny_recipe, "--checkpoint", ckpt))
    assert "holds tiny_seg (segmentation, 10 classes) but this recipe builds tiny_ssd (detection" in message
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {"backbone.0.weight": torch.zeros(3)}}, foreign)
    message = one_line_error(*run_cli("evaluate", tiny_recipe, "--checkpoint", foreign))
    assert "does not fit tiny_seg" in message and "it has no " in message
    out = tmp_path / "start"  # model.checkpoint: refused in round 0, and the fixed recipe reruns in place
    start = ["run", tiny_recipe, "--out", out, "--quiet", "--set", "rounds.count=0", "--set", f"model.checkpoint={ckpt}"]
    message = one_line_error(*run_cli(*start, "--set", "model.options.width=16"))
    assert "does not fit tiny_seg" in message and not (out / "checkpoints").exists()
    code, text = run_cli(*start)
    assert code == 0, text


# -- a full disk ---------------------------------------------------------------------------------

def small_files() -> None:
    """In the child: writes past 1 MB fail with EFBIG, as on a full disk (round 1's checkpoints are
    larger: they carry the CBST histogram; round 0's are smaller)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_resumed_run_is_exact(tiny_recipe, tmp_path, full_run):
    part = tmp_path / "part"
    args = [sys.executable, "-m", "selftrain.cli", "run", str(tiny_recipe), "--out", str(part), "--quiet", *ONE_ROUND]
    failed = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600, preexec_fn=small_files)
    assert failed.returncode == 2 and len(failed.stderr.strip().splitlines()) == 1, failed.stderr
    assert failed.stderr.startswith(f"error: cannot write {part / 'checkpoints'}/") and "File too large" in failed.stderr
    assert (part / "checkpoints" / "round_000.pt").is_file()
    code, text = run_cli("run", tiny_recipe, "--out", part, "--resume", "--quiet", *ONE_ROUND)
    assert code == 0, text
    assert_same_result(full_run, part)


# -- rounds that learn nothing -------------------------------------------------------------------

def test_a_round_without_pseudo_labels_is_a_warning(tiny_recipe, tmp_path):
    code, text = run_cli("run", tiny_recipe, "--out", tmp_path / "run", "--quiet", *ONE_ROUND,
                         "--set", "rounds.portion={start: 1.0e-9, step: 0.0, max: 1.0e-9}")
    assert code == 0, text
    assert "round 1: no target pixel passed the thresholds" in text and "raise rounds.portion (1e-09" in text
