"""The trainer core in whole runs: the EMA teacher's start, mixed precision, clipping and
accumulation from the recipe, and a resume at step granularity (fast, in-process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from selftrain.cli import main
from selftrain.training import StepRunner


def run_cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_ema_teacher_starts_from_the_model_the_first_online_round_starts_from(det_tiny_recipe, tmp_path):
    out = tmp_path / "mt"
    code, text = run_cli("run", det_tiny_recipe, "--out", out, "--quiet", "--set", "policy.name=mean_teacher",
                         "--set", "policy.options={threshold: 0.0, decay: 0.99}", "--set", "rounds.count=1",
                         "--set", "rounds.steps=1")
    assert code == 0, text
    start = torch.load(out / "checkpoints" / "round_000.pt", weights_only=False)["model"]
    after = torch.load(out / "checkpoints" / "round_001.pt", weights_only=False)
    student, teacher = after["model"], after["teacher"]["model"]
    moved = 0
    for name, value in teacher.items():
        if not value.dtype.is_floating_point or "running" in name or "num_batches" in name:
            continue
        # one EMA update with the warm-up rate min(0.99, 1/10): teacher = 0.1 * start + 0.9 * student
        expected = 0.1 * start[name] + 0.9 * student[name]
        assert torch.allclose(value, expected, atol=1e-6), name
        moved += not torch.equal(start[name], student[name])
    assert moved > 0  # the step changed the student, so the test tells the two starts apart


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["tiny_recipe", "det_tiny_recipe"])
def test_bf16_runs_finish_with_finite_losses(recipe, request, tmp_path):
    out = tmp_path / "bf16"
    extra = ["--set", "policy.name=mean_teacher", "--set", "policy.options={threshold: 0.0}"] \
        if recipe == "det_tiny_recipe" else []
    code, text = run_cli("run", request.getfixturevalue(recipe), "--out", out, "--quiet", "--set", "precision=bf16",
                         "--set", "rounds.optim.clip_grad_norm=1.0", "--set", "rounds.optim.accumulate=2", *extra)
    assert code == 0, text
    recs = records(out)
    assert [r["round"] for r in recs] == [0, 1, 2]
    for r in recs:
        assert r["losses"] == {} or all(v == v and abs(v) < 1e6 for v in r["losses"].values())
    assert "precision: bf16" in (out / "config.yaml").read_text()


def test_accumulation_draws_that_many_batches_a_step(tiny_recipe, tmp_path, monkeypatch):
    calls = []
    original = StepRunner.step

    def counting(self, step_fn, step):
        calls.append(self.accumulate)
        return original(self, step_fn, step)

    monkeypatch.setattr(StepRunner, "step", counting)
    code, text = run_cli("run", tiny_recipe, "--out", tmp_path / "acc", "--quiet", "--set", "rounds.optim.accumulate=3",
                         "--set", "rounds.count=1")
    assert code == 0, text
    assert calls == [1] * 6 + [3] * 3  # round 0 (6 steps, accumulate 1), round 1 (3 steps of 3 micro-batches)


@pytest.mark.parametrize("setting,message", [
    ("precision=fp8", "recipe key precision is 'fp8'; choose one of: fp32, bf16, fp16"),
    ("rounds.optim.accumulate=0", "rounds.optim.accumulate must be >= 1"),
    ("source_training.optim.clip_grad_norm=-1", "source_training.optim.clip_grad_norm must be positive"),
    ("checkpoint.every_steps=0", "checkpoint.every_steps must be >= 1"),
    ("checkpoint.every=5", "unknown recipe key checkpoint.every; valid keys under checkpoint: every_steps"),
])
def test_bad_trainer_settings_are_one_line(tiny_recipe, tmp_path, setting, message):
    code, text = run_cli("run", tiny_recipe, "--out", tmp_path / "bad", "--set", setting)
    assert code == 2 and message in text and len(text.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


class Interrupt(BaseException):
    """A stand-in for the process being killed: not an Exception, so the command line's error
    contract does not turn it into an error line."""


@pytest.mark.parametrize("policy,stop", [("cbst", 9), pytest.param("mean_teacher", 9, marks=pytest.mark.slow)])
def test_an_interrupted_round_resumes_at_its_last_step_checkpoint(tiny_recipe, tmp_path, monkeypatch, policy, stop):
    """Round 0 is 6 steps, rounds are 3; step checkpoints every 2 steps. Stopping at step call ``stop``
    leaves round 1's step checkpoint at step 1 or 2; the resumed run redoes only what came after it."""
    sets = ["--set", f"policy.name={policy}", "--set", "checkpoint.every_steps=2", "--quiet"]
    if policy == "mean_teacher":
        sets += ["--set", "policy.options={threshold: 0.14}"]
    code, text = run_cli("run", tiny_recipe, "--out", tmp_path / "full", *sets)
    assert code == 0, text
    calls = []
    original = StepRunner.step

    def stopping(self, step_fn, step):
        calls.append(step)
        if len(calls) == stop:
            raise Interrupt
        return original(self, step_fn, step)

    monkeypatch.setattr(StepRunner, "step", stopping)
    with pytest.raises(Interrupt):
        run_cli("run", tiny_recipe, "--out", tmp_path / "part", *sets)
    state = torch.load(tmp_path / "part" / "checkpoints" / "step.pt", weights_only=False)
    assert state["round"] == 1 and state["step"] == 2
    calls.clear()
    code, text = run_cli("run", tiny_recipe, "--out", tmp_path / "part", "--resume", *sets)
    assert code == 0, text
    assert calls[0] == 2 and len(calls) == 1 + 3  # round 1 from its step 2, then round 2
    assert (tmp_path / "part" / "metrics.jsonl").read_text() == (tmp_path / "full" / "metrics.jsonl").read_text()
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "part" / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "part" / "checkpoints" / "step.pt").exists()
