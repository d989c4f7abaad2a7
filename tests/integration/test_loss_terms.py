"""Adversarial loss terms in whole runs: recipe entries, logged losses, phases, checkpoints, resume,
and one-line errors for entries that cannot work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from selftrain.cli import main


def run_cli(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_bsr_and_dann_in_a_detection_run(det_tiny_recipe, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_cli("run", det_tiny_recipe, "--out", out, "--quiet", "--set",
                           "losses=[{name: bsr}, {name: dann, weight: 0.1, phases: [source]}]")
    assert code == 0, err
    recs = records(out)
    assert {"src/cls", "bsr/bsr", "dann/domain"} <= recs[0]["losses"].keys()
    assert all("bsr/bsr" in r["losses"] and "dann/domain" not in r["losses"] for r in recs[1:])
    assert all(r["losses"]["bsr/bsr"] > 0 for r in recs)
    ckpt = torch.load(out / "checkpoints" / "round_002.pt", weights_only=False)
    assert len(ckpt["loss_terms"]["terms"]) == 2 and ckpt["loss_terms"]["optimizers"][0] is None  # BSR: no D


def test_output_space_in_a_segmentation_run(tiny_recipe, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_cli("run", tiny_recipe, "--out", out, "--quiet", "--set",
                           "losses=[{name: output_space, weight: 0.001}]")
    assert code == 0, err
    for rec in records(out):
        assert {"output_space/adv", "output_space/d"} <= rec["losses"].keys()
        assert 0 < rec["losses"]["output_space/adv"] < 0.01  # weighted once: 0.001 x BCE (about 0.69)


def test_resume_restores_the_discriminators(det_tiny_recipe, resumed):
    full, part = resumed(det_tiny_recipe, ["--set", "losses=[{name: dann, weight: 0.5}]", "--set",
                                           "policy.options={threshold: 0.0}", "--quiet"])
    a = torch.load(full / "checkpoints" / "round_002.pt", weights_only=False)["loss_terms"]
    b = torch.load(part / "checkpoints" / "round_002.pt", weights_only=False)["loss_terms"]
    for key, value in a["terms"][0].items():
        assert torch.equal(value, b["terms"][0][key]), key


@pytest.mark.parametrize("entry,message", [
    ("[{name: bsrr}]", "unknown loss 'bsrr'; choose one of: bsr, dann, output_space"),
    ("[{name: bsr, options: {gama: 2}}]", "losses[0] (bsr): options do not fit"),
    ("[{name: bsr, phases: [sourc]}]", "losses[0].phases[0] is 'sourc'; choose one of: source, rounds"),
    ("[{name: bsr, phases: []}]", "phases is empty"),
    ("[{name: output_space}]", "loss output_space works for segmentation, not detection"),
    ("[{name: dann, options: {tap: backbone.0}}]", "no feature tap 'backbone.0' (it offers: conv4_3)"),
    ("[{name: bsr, wieght: 1}]", "unknown recipe key losses[0].wieght"),
    ("[{name: dann, options: {optim: {name: rmsprop}}}]", "unknown optim name 'rmsprop'; choose sgd, adam, adamw"),
])
def test_bad_loss_entries_fail_in_one_line(det_tiny_recipe, tmp_path, entry, message):
    out = tmp_path / "run"
    code, _, err = run_cli("run", det_tiny_recipe, "--out", out, "--set", f"losses={entry}")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_terms_that_need_source_images_need_a_source_batch_in_the_rounds(det_tiny_recipe, tmp_path):
    code, _, err = run_cli("run", det_tiny_recipe, "--out", tmp_path / "r", "--set", "losses=[{name: dann}]",
                           "--set", "rounds.batch_source=0")
    assert code == 2 and "set rounds.batch_source >= 1" in err


def test_dann_is_refused_for_segmenters(tiny_recipe, tmp_path):
    code, _, err = run_cli("run", tiny_recipe, "--out", tmp_path / "r", "--set", "losses=[{name: dann}]")
    assert code == 2 and "loss dann works for detection, not segmentation" in err


def test_list_losses():
    code, out, _ = run_cli("list", "losses")
    assert code == 0
    assert out.splitlines() == ["bsr  (detection)", "dann  (detection)", "output_space  (segmentation)"]
