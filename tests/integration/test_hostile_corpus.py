"""Every hostile input of ``tests/hostile.py`` ends in exit code 2, one ``error:`` line naming the
problem, no traceback, and no file of the user changed; the controls check that each setup, left
undamaged, is accepted, so that a case fails for its one fault and not for the fixture."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from hostile import CASES, Env, base_recipe, copied_run, det_data, seg_data, snapshot, violations

from selftrain.cli import main


pytestmark = pytest.mark.usefixtures("restore_logging")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One finished tiny run (round 0 and two rounds of one step each), copied by the cases that need one."""
    folder = tmp_path_factory.mktemp("hostile_run")
    env = Env(folder, folder / "unused")
    recipe = base_recipe(env)["recipe"]
    result = CliRunner().invoke(main, ["run", recipe, "--out", str(folder / "run"), "--quiet"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return folder / "run"


@pytest.fixture
def env(tmp_path, tiny_run, monkeypatch) -> Env:
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    monkeypatch.chdir(case_dir)  # a default runs/<name> lands where the snapshot sees it
    return Env(case_dir, tiny_run)


def invoke(args: list[str]):
    return CliRunner().invoke(main, args)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else [])
                                  for c in CASES])
def test_hostile_input(case, env):
    subs = {"tmp": str(env.tmp), **case.setup(env)}
    before = snapshot(env.tmp)
    result = invoke(case.args(subs))
    problems = violations(case, subs, result, before, snapshot(env.tmp))
    assert not problems, "\n".join([f"argv: {case.args(subs)}", *problems,
                                    f"stdout: {result.stdout[-800:]}", f"stderr: {result.stderr[-800:]}"])


def test_corpus_size_and_ids():
    families = {c.family for c in CASES}
    assert len(CASES) >= 220 and len({c.id for c in CASES}) == len(CASES)
    assert families == {"recipe", "set", "data", "run", "checkpoint", "round", "prior", "cli"}
    assert sum(c.slow for c in CASES) < 0.1 * len(CASES)


# ---------------------------------------------------------------------------------------------
# Controls: the undamaged inputs each family starts from are accepted


def test_control_data_layouts(env):
    """The segmentation layouts pass ``data check``; every item of the detection layouts loads."""
    from selftrain.build import build_data
    from selftrain.config import load_recipe

    result = invoke(["data", "check", seg_data(lambda tmp: None)(env)["recipe"]])
    assert result.exit_code == 0, result.output
    for target in ("clipart", "coco"):
        shutil.rmtree(env.tmp)
        env.tmp.mkdir()
        data = build_data(load_recipe(det_data(lambda tmp: None, target)(env)["recipe"]))
        for split in (data.source, data.target, data.target_val):
            assert len(split) == 3 and all(split[i]["image"].ndim == 3 for i in range(len(split)))


def test_control_round_files(env):
    subs = {"tmp": str(env.tmp), **copied_run()(env)}
    for args in (["labels", "summary", "{run}"], ["labels", "diff", "{run}", "1", "2"],
                 ["labels", "show", "{run}", "--round", "1", "--index", "0", "--out", "{tmp}/o.png"],
                 ["labels", "export", "{run}", "--round", "1", "--format", "png", "--out", "{tmp}/e"]):
        result = invoke([a.format(**subs) for a in args])
        assert result.exit_code == 0, (args, result.output)


def test_control_checkpoint_and_prior(env):
    import numpy as np

    recipe = base_recipe(env)["recipe"]
    ckpt = env.run / "checkpoints" / "round_000.pt"
    result = invoke(["evaluate", recipe, "--checkpoint", str(ckpt)])
    assert result.exit_code == 0, result.output
    prior = env.tmp / "p.npz"
    np.savez(prior, prior=np.full((10, 8, 16), 1.0 / 128, np.float32))
    result = invoke(["priors", "show", str(prior), "--out", str(env.tmp / "h.png")])
    assert result.exit_code == 0, result.output


def test_control_resume_of_a_cut_run(env):
    """The run-folder cases damage a copy cut after round 1; undamaged, that copy resumes."""
    from hostile import _cut_last_round

    subs = copied_run(_cut_last_round)(env)
    result = invoke(["run", subs["recipe"], "--out", subs["run"], "--resume", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (Path(subs["run"]) / "pseudo" / "round_002.h5").is_file()
