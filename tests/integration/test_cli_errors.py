"""The command line's error contract, command by command: one line on stderr, the exit code, no
traceback unless --debug; internal errors, OS errors and Ctrl-C included."""

from __future__ import annotations

import errno
import os
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from conftest import REPO, TINY
from selftrain.cli import main, parse_seeds

TINY_RUN = ["--set", "rounds.count=1", "--quiet"]
COMMANDS = ["run", "evaluate", "data synth", "data check", "recipes list", "recipes cp", "priors build", "priors show",
            "labels summary", "labels show", "labels diff", "labels export", "list", "demo"]


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, list(args), catch_exceptions=False, env=env)


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished tiny run with one round of pseudo-labels (its recipe beside it: tiny.yaml)."""
    root = tmp_path_factory.mktemp("errors")
    recipe = root / "tiny.yaml"
    recipe.write_text(TINY.format(defaults=REPO / "recipes" / "defaults.yaml"))
    result = invoke("run", str(recipe), "--out", str(root / "run"), *TINY_RUN)
    assert result.exit_code == 0, result.output
    return root / "run"


def commands(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from commands(cmd, prefix + (name,))
        else:
            yield prefix + (name,), cmd


def test_every_command_follows_the_contract():
    found = {" ".join(path): getattr(cmd.callback, "error_contract", False) for path, cmd in commands(main)}
    assert len(found) >= 14 and all(found.values()), [k for k, v in found.items() if not v]


def bad_invocations(tmp: Path, run: Path) -> dict[str, tuple[list[str], str]]:
    """One bad invocation per command and a piece of the line it must print."""
    afile = tmp / "afile"
    afile.write_text("x")
    return {
        "run": (["run", "synth_st", "--set", "rounds.cuont=1", "--out", str(tmp / "r")], "unknown recipe key"),
        "evaluate": (["evaluate", str(run.parent / "tiny.yaml"), "--checkpoint", str(tmp / "none.pt")],
                     "does not exist"),
        "data synth": (["data", "synth", "--out", str(tmp / "s"), "--height", "0"], "height must be"),
        "data check": (["data", "check", "synth_st", "--limit", "0"], "--limit"),
        "recipes list": (["recipes", "list", "--long"], "No such option '--long'"),
        "recipes cp": (["recipes", "cp", "nope", str(tmp / "x.yaml")], "no built-in recipe nope"),
        "priors build": (["priors", "build", "--dataset", "synth_street", "--out", str(tmp / "p.npz"), "--ksize", "0"],
                         "--ksize"),
        "priors show": (["priors", "show", str(tmp / "none.npz")], "does not exist"),
        "labels summary": (["labels", "summary", str(tmp / "norun")], "does not exist"),
        "labels show": (["labels", "show", str(run), "--round", "1", "--index", "0", "--out",
                         str(afile / "sub" / "x.png")], "Not a directory"),
        "labels diff": (["labels", "diff", str(run), "1", "4"], "round 4 has no pseudo-label file"),
        "labels export": (["labels", "export", str(run), "--round", "1", "--format", "tiff", "--out",
                           str(tmp / "e")], "--format 'tiff' is unknown"),
        "list": (["list", "models"], "'models' is not one of"),
        "demo": (["demo", "--seeds", "a,b", "--out", str(tmp / "d")], "--seeds must be comma-separated"),
    }


def test_every_command_has_a_bad_invocation(tmp_path):
    names = {" ".join(path) for path, _ in commands(main)}
    assert names == set(COMMANDS) == set(bad_invocations(tmp_path, tmp_path))


@pytest.mark.parametrize("command", COMMANDS)
def test_bad_invocation_is_one_line_and_exit_2(command, tmp_path, tiny_run):
    args, expected = bad_invocations(tmp_path, tiny_run)[command]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert expected in one_error_line(result)
    assert not (tmp_path / "d").exists() and not (tmp_path / "e").exists() and not (tmp_path / "s").exists()


def test_seeds_are_integers():
    assert parse_seeds("0, 1,2") == [0, 1, 2]
    for bad in ("", ",", "1.5", "-1", "0,x"):
        with pytest.raises(Exception, match="--seeds must be"):
            parse_seeds(bad)


def boom(*args, **kwargs):
    raise RuntimeError("boom\nsecond line")


def test_internal_error_is_one_line_that_asks_for_debug(monkeypatch):
    monkeypatch.setattr("selftrain.catalog.describe", boom)
    result = invoke("recipes", "list")
    assert result.exit_code == 1
    line = one_error_line(result)
    assert line.startswith("error: internal error: RuntimeError: boom second line;") and "--debug" in line


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(monkeypatch, how):
    monkeypatch.setattr("selftrain.catalog.describe", boom)
    result = (invoke("--debug", "recipes", "list") if how == "flag"
              else invoke("recipes", "list", env={"SELFTRAIN_DEBUG": "1"}))
    assert result.exit_code == 1
    assert "Traceback (most recent call last)" in result.stderr and 'raise RuntimeError("boom' in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: internal error: RuntimeError: boom")


def test_debug_shows_the_traceback_of_a_user_error(tmp_path):
    result = invoke("--debug", "priors", "show", str(tmp_path / "none.npz"))
    assert result.exit_code == 2 and "Traceback" in result.stderr and "selftrain.errors." in result.stderr


def test_os_error_names_the_path_and_the_reason(monkeypatch, tmp_path):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "out" / "x.yaml"))

    monkeypatch.setattr("selftrain.catalog.copy_recipe", denied)
    result = invoke("recipes", "cp", "synth_st", str(tmp_path / "out" / "x.yaml"))
    assert result.exit_code == 2
    assert one_error_line(result) == (f"error: {tmp_path / 'out' / 'x.yaml'}: Permission denied; choose a path "
                                      "you may write to, or change its permissions")


def test_disk_full_without_a_path(monkeypatch, tmp_path):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("selftrain.catalog.copy_recipe", full)
    result = invoke("recipes", "cp", "synth_st", str(tmp_path / "x.yaml"))
    assert result.exit_code == 2 and "error: No space left on device; free some disk space" in one_error_line(result)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        result = invoke("data", "synth", "--out", str(ro / "bench"), "--num-source", "1", "--num-target-train", "1",
                        "--num-target-val", "1")
    finally:
        ro.chmod(0o755)
    assert result.exit_code == 2
    line = one_error_line(result)
    assert str(ro / "bench") in line and "Permission denied" in line


def test_interrupted_run_says_how_to_resume(monkeypatch, tmp_path, tiny_run):
    def interrupt(self, resume=False):
        raise KeyboardInterrupt

    monkeypatch.setattr("selftrain.engine.Engine.run", interrupt)
    out, recipe = tmp_path / "run dir", str(tiny_run.parent / "tiny.yaml")
    result = invoke("run", recipe, "--out", str(out), "--set", "rounds.count=1", "--quiet")
    assert result.exit_code == 130
    line = one_error_line(result)
    expected = shlex.join(["selftrain", "run", recipe, "--set", "rounds.count=1", "--out", str(out), "--quiet",
                           "--resume"])
    assert line.startswith("error: interrupted; continue with `") and expected in line, line


def test_interrupted_command_without_resume(monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("selftrain.catalog.describe", interrupt)
    result = invoke("recipes", "list")
    assert result.exit_code == 130 and "interrupted" in one_error_line(result) and "--resume" not in result.stderr


def test_divergence_stays_exit_1_with_the_hint(monkeypatch):
    def diverge(*args, **kwargs):
        raise FloatingPointError("loss diverged at step 3 (round 1: fine-tune): src/ce=1e+12")

    monkeypatch.setattr("selftrain.catalog.describe", diverge)
    result = invoke("recipes", "list")
    assert result.exit_code == 1
    assert one_error_line(result).endswith("src/ce=1e+12; lower the learning rate or check the labels")


def test_help_and_version_still_exit_0():
    assert invoke("--help").exit_code == 0 and invoke("--version").exit_code == 0
    assert invoke("labels", "show", "--help").exit_code == 0
