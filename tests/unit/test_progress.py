"""Progress off a terminal: periodic one-line records on stderr (a fake clock sets the pace), none
when quiet, and the step runner's records show the losses of the step just finished."""

from __future__ import annotations

import io
import re

import pytest
import torch
from torch import nn

import selftrain.progress as progress_mod
from selftrain.errors import UserError
from selftrain.progress import duration, format_record, progress, record_seconds
from selftrain.training import HookBase, StepResult, StepRunner, make_scheduler


class Clock:
    """Stands in for time.monotonic; the loop bodies move it on."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    """stderr is captured (not a terminal), nothing asks for quiet, records every 20 s of a fake clock."""
    fake = Clock()
    monkeypatch.setattr(progress_mod, "_clock", fake)
    monkeypatch.setattr(progress_mod, "_QUIET", False)
    monkeypatch.delenv("SELFTRAIN_QUIET", raising=False)
    monkeypatch.setenv("SELFTRAIN_PROGRESS_SECONDS", "20")
    return fake


def records(text: str) -> list[str]:
    """The records without their time stamps."""
    return [re.sub(r"^\S+ \S+ ", "", line) for line in text.splitlines()]


def test_off_a_terminal_a_record_every_interval_and_one_at_the_end(clock, capsys):
    seen = []
    for i in progress(range(10), desc="count", unit="img"):
        seen.append(i)
        clock.now += 7.0
    out = capsys.readouterr()
    assert seen == list(range(10)) and out.out == ""
    # 21 s after the start 3 images are done: 7 s/img, 7 left -> 49 s; the 10th gets only the end record
    assert records(out.err) == ["count  img 3/10  7 s/img  ETA 49s",
                                "count  img 6/10  7 s/img  ETA 28s",
                                "count  img 9/10  7 s/img  ETA 7s",
                                "count  img 10/10  7 s/img  done in 1m10s"]


def test_no_record_before_the_interval_and_none_for_a_loop_left_early(clock, capsys):
    for _ in progress(range(5), desc="fast", unit="it"):
        clock.now += 1.0
    for i in progress(iter(range(100)), desc="left", unit="it"):  # no length: no total, no ETA
        clock.now += 30.0
        if i == 1:
            break
    assert records(capsys.readouterr().err) == ["fast  it 5/5  1 it/s  done in 5s", "left  it 1  30 s/it"]


@pytest.mark.parametrize("quiet", ["env", "flag"])
def test_quiet_prints_nothing_off_a_terminal(clock, capsys, monkeypatch, quiet):
    if quiet == "env":
        monkeypatch.setenv("SELFTRAIN_QUIET", "1")
    else:
        monkeypatch.setattr(progress_mod, "_QUIET", True)
    assert list(progress(range(4), desc="q", unit="it", losses=lambda: {"ce": 1.0})) == [0, 1, 2, 3]
    clock.now += 100.0
    out = capsys.readouterr()
    assert out.err == "" and out.out == ""


def test_a_terminal_gets_the_bar_and_no_records(clock, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    monkeypatch.setattr("sys.stderr", term)
    for _ in progress(range(3), desc="bar", unit="it"):
        clock.now += 60.0
    assert "bar" in term.getvalue() and "ETA" not in term.getvalue()  # tqdm's bar says "it/s", not ETA


def test_losses_are_read_only_when_a_record_is_written(clock, capsys):
    calls = []

    def losses():
        calls.append(len(calls))
        return {"src/ce": 0.4123456, "tgt/ce": 2.0}

    for _ in progress(range(6), desc="train", unit="step", total=8, initial=2, losses=losses):
        clock.now += 10.0
    assert records(capsys.readouterr().err) == [
        "train  step 4/8  10 s/step  ETA 40s  loss src/ce=0.4123 tgt/ce=2",
        "train  step 6/8  10 s/step  ETA 20s  loss src/ce=0.4123 tgt/ce=2",
        "train  step 8/8  10 s/step  done in 1m00s  loss src/ce=0.4123 tgt/ce=2"]
    assert len(calls) == 3


class Last(HookBase):
    """Keeps every step's losses as the runner hands them to hooks."""

    def __init__(self) -> None:
        self.losses: dict[int, dict[str, float]] = {}

    def after_step(self, step, losses):
        self.losses[step] = {k: float(v) for k, v in losses.items()}


def test_step_runner_records_show_the_last_steps_losses(clock, capsys):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = Last()
    runner = StepRunner(optimizer=opt, scheduler=make_scheduler(opt, "constant", 9), hooks=[hook], accumulate=2)
    x, y = torch.randn(6, 4), torch.randn(6, 2)

    def step_fn(step: int) -> StepResult:
        clock.now += 5.0
        out = model(x)
        return StepResult({"mse": ((out - y) ** 2).mean(), "l1": (out - y).abs().mean() * 0.1})

    runner.run(step_fn, steps=9, start=1, desc="round 1: train")
    lines = records(capsys.readouterr().err)
    assert [line.split("  ")[1] for line in lines] == ["step 3/9", "step 5/9", "step 7/9", "step 9/9"]
    for line in lines:
        step = int(line.split("  ")[1].split()[1].split("/")[0]) - 1  # the step just finished
        last, before = hook.losses[step], hook.losses[step - 1]
        assert line.endswith(f"loss mse={last['mse']:.4g} l1={last['l1']:.4g}")
        assert f"{last['mse']:.4g}" != f"{before['mse']:.4g}"  # the check can tell the steps apart
    assert lines[0].startswith("round 1: train  step 3/9  10 s/step  ETA 1m00s  loss ")
    assert {k: float(v) for k, v in runner.last_losses.items()} == hook.losses[8]


def test_a_bad_interval_is_an_error_that_names_the_variable(monkeypatch):
    for bad in ("0", "-5", "soon", "inf", "nan"):
        monkeypatch.setenv("SELFTRAIN_PROGRESS_SECONDS", bad)
        with pytest.raises(UserError, match=f"SELFTRAIN_PROGRESS_SECONDS .* got '{bad}'"):
            record_seconds()
    monkeypatch.delenv("SELFTRAIN_PROGRESS_SECONDS")
    assert record_seconds() == 60.0
    monkeypatch.setenv("SELFTRAIN_PROGRESS_SECONDS", "2.5")
    assert record_seconds() == 2.5


def test_durations_and_a_record_without_losses():
    assert [duration(s) for s in (0, 41.6, 60, 1226, 3599.4, 11100)] == ["0s", "42s", "1m00s", "20m26s",
                                                                         "59m59s", "3h05m"]
    assert format_record("eval", "batch", position=0, total=4, done=0, elapsed=0.0, losses={},
                         finished=False) == "eval  batch 0/4"
