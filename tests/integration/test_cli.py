"""The CLI on the tiny model: a golden run, resume equivalence, and errors a user can cause."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from selftrain.build import build_engine
from selftrain.cli import main
from selftrain.config import load_recipe
from selftrain.data import build_split
from selftrain.metrics import miou
from selftrain.store import open_round


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def constant_predictor(recipe: Path, overrides: list[str]) -> dict[str, float]:
    """mIoU and pixel accuracy (%) on the recipe's target val of the best constant prediction (one
    class everywhere, the majority class): what a collapsed model scores."""
    cfg = load_recipe(recipe, overrides)
    val = build_split(cfg.data.target_val, cfg, with_labels=True)
    gt = np.stack([val[i]["label"].numpy() for i in range(len(val))])
    scored = gt != cfg.data.ignore_index
    best = max(miou(np.full_like(gt, c), gt, cfg.data.num_classes, cfg.data.ignore_index)[0]
               for c in range(cfg.data.num_classes))
    share = np.bincount(gt[scored], minlength=cfg.data.num_classes).max() / scored.sum()
    return {"miou": 100 * best, "accuracy": 100 * share}


# Enough training for the tiny model to learn the scenes: with the fixture's 6 source steps at width 8
# it scores what a constant prediction does (3.4 % mIoU) and falls to 0.7 % after the rounds.
GOLDEN_SETS = ["source_training.steps=30", "source_training.optim.lr=5.0e-3", "model.options.width=16"]


def test_golden_run(tiny_recipe, tmp_path):
    out = tmp_path / "run"
    code, output = run_cli("run", str(tiny_recipe), "--out", str(out), *[a for s in GOLDEN_SETS for a in ("--set", s)])
    assert code == 0, output
    assert "round 2" in output and "source only" in output and "threshold" in output
    for rel in ["config.yaml", "metrics.jsonl", "pseudo/round_001.h5", "pseudo/round_002.h5",
                "checkpoints/round_000.pt", "checkpoints/round_002.pt", "checkpoints/last.pt",
                "eval/round_000.json", "eval/round_002.json"]:
        assert (out / rel).is_file(), rel
    assert not list((out / "pseudo").glob("*.tmp")) and not list((out / "pseudo").glob(".*"))
    recs = records(out)
    assert [r["round"] for r in recs] == [0, 1, 2]
    assert [r["portion"] for r in recs[1:]] == pytest.approx([0.2, 0.25])
    with open_round(out / "pseudo" / "round_002.h5") as reader:
        assert len(reader) == 12 and reader.meta["policy"] == "cbst" and reader.meta["round"] == 2
        assert reader.labels(0).shape == (32, 64)
        selected = sum(int(np.sum(reader.labels(i) != 255)) for i in range(len(reader)))
        assert selected == sum(recs[2]["pseudo"]["selected_pixels"])
        np.testing.assert_allclose(reader.thresholds, recs[2]["pseudo"]["thresholds"], rtol=1e-6)
    with h5py.File(out / "pseudo" / "round_001.h5", "r") as f:  # plain h5py
        assert f["labels"].shape == (12, 32, 64) and f.attrs["format"] == "selftrain.pseudo/1"
    ckpt = torch.load(out / "checkpoints" / "round_002.pt", weights_only=False)
    assert "rounds:" in ckpt["recipe"] and ckpt["round"] == 2 and ckpt["policy"]["name"] == "cbst"
    # a collapsed model predicts one class everywhere: here road, 3.4 % mIoU at 33.6 % pixel accuracy
    floor = constant_predictor(tiny_recipe, GOLDEN_SETS)
    assert floor["miou"] < 4 and floor["accuracy"] < 35
    for rec in recs:  # before and after self-training
        assert rec["eval"]["miou"] > 3 * floor["miou"], rec["eval"]
        assert rec["eval"]["accuracy"] > floor["accuracy"] + 5, rec["eval"]
        assert sum(iou > 5 for iou in rec["eval"]["iou"] if iou is not None) >= 4
    # golden numbers of this recipe (CPU, torch 2.14.1, x86-64); tolerances absorb BLAS differences
    assert recs[0]["eval"]["miou"] == pytest.approx(GOLDEN["miou0"], abs=0.5)
    assert recs[1]["pseudo"]["selected_share"] == pytest.approx(GOLDEN["share1"], abs=0.01)
    assert recs[1]["pseudo"]["thresholds"][:3] == pytest.approx(GOLDEN["thresholds1"], abs=2e-3)
    assert recs[2]["eval"]["miou"] == pytest.approx(GOLDEN["miou2"], abs=0.5)


GOLDEN = {"miou0": 14.084, "share1": 0.2196, "thresholds1": [0.3013, 0.1563, 0.3530], "miou2": 16.405}


class Interrupt(Exception):
    pass


class StopAt:
    """Raise inside round ``r`` after its evaluation, before its checkpoint (a crash mid-round)."""

    def __init__(self, r: int) -> None:
        self.r = r

    def on_round_end(self, *, record, **_):
        if record["round"] == self.r:
            raise Interrupt


def test_resume_reaches_the_same_result(tiny_recipe, tmp_path):
    cfg = load_recipe(tiny_recipe, ["rounds.count=3"])
    full = build_engine(cfg, tmp_path / "full").run()
    engine = build_engine(cfg, tmp_path / "cut")
    engine.callbacks.insert(0, StopAt(2))
    with pytest.raises(Interrupt):
        engine.run()
    assert not (tmp_path / "cut" / "checkpoints" / "round_002.pt").exists()
    code, output = run_cli("run", str(tiny_recipe), "--set", "rounds.count=3", "--out", str(tmp_path / "cut"), "--resume")
    assert code == 0, output
    resumed = records(tmp_path / "cut")
    assert [r["round"] for r in resumed] == [0, 1, 2, 3]
    assert resumed[-1]["eval"] == full[-1]["eval"]
    assert resumed[-1]["pseudo"]["thresholds"] == full[-1]["pseudo"]["thresholds"]


def test_existing_run_is_not_overwritten(tiny_recipe, tmp_path):
    out = tmp_path / "run"
    assert run_cli("run", str(tiny_recipe), "--out", str(out), "--set", "rounds.count=0")[0] == 0
    before = (out / "checkpoints" / "round_000.pt").read_bytes()
    code, output = run_cli("run", str(tiny_recipe), "--out", str(out), "--set", "rounds.count=0")
    assert code == 2 and "--resume" in output and len(output.strip().splitlines()) == 1
    code, output = run_cli("run", str(tiny_recipe), "--out", str(out), "--set", "rounds.count=1", "--resume")
    assert code == 2 and "another recipe" in output
    assert (out / "checkpoints" / "round_000.pt").read_bytes() == before


@pytest.mark.parametrize(
    "override, message",
    [
        ("rounds.cuont=1", "unknown recipe key rounds.cuont"),
        ("rounds.count=two", "rounds.count must be an integer"),
        ("data.num_classes=5", "class_names"),
        ("data.source.root=/nonexistent/gta", "data path /nonexistent/gta does not exist"),
        ("model.name=unet3000", "unknown adapter 'unet3000'"),
        ("model.name=smp_unet", "Unet got an unexpected keyword argument 'width'"),  # smp alone would ignore it
        ("policy.name=cbst_sp", "needs policy.prior"),
        ("policy.prior=/nonexistent/prior.npz", "only used by st_sp and cbst_sp"),
        ("data.source.options.colour=1", "no option 'colour'"),
        ("data.target.options.num_images=0", "data.target holds no images"),
    ],
)
def test_bad_recipe_input_is_one_line_and_exit_2(tiny_recipe, tmp_path, override, message):
    out = tmp_path / "run"
    code, output = run_cli("run", str(tiny_recipe), "--out", str(out), "--set", override)
    assert code == 2
    assert message in output and len(output.strip().splitlines()) == 1
    assert not (out / "checkpoints").exists()


def test_head_learning_rate_needs_a_model_with_a_head(tiny_recipe, tmp_path):
    out = tmp_path / "run"
    code, output = run_cli("run", str(tiny_recipe), "--out", str(out), "--set", "model.name=fcn8s_vgg16",
                           "--set", "source_training.optim.head_lr_mult=10")
    assert code == 2 and len(output.strip().splitlines()) == 1
    assert "source_training.optim.head_lr_mult is 10.0 but this model has no separate head" in output
    assert "fcn8s_vgg16" in output and not (out / "checkpoints").exists()


def write_folder(root: Path, n: int = 3, label_value: int = 1) -> Path:
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((16, 32, 3), 40 * i, np.uint8)).save(root / "images" / f"im{i}.png")
        Image.fromarray(np.full((16, 32), label_value, np.uint8)).save(root / "labels" / f"im{i}.png")
    return root


def folder_args(tiny_recipe, root: Path, out: Path) -> list[str]:
    return ["run", str(tiny_recipe), "--out", str(out), "--set", "data.source={name: folder, root: %s}" % root,
            "--set", "rounds.count=0", "--set", "data.target_val=null"]


def test_label_out_of_range_and_corrupt_image(tiny_recipe, tmp_path):
    root = write_folder(tmp_path / "bad_label", label_value=42)
    code, output = run_cli(*folder_args(tiny_recipe, root, tmp_path / "r1"))
    assert code == 2 and "label value 42" in output and "out of range for 10 classes" in output
    root = write_folder(tmp_path / "corrupt")
    (root / "images" / "im1.png").write_bytes(b"not a png")
    code, output = run_cli(*folder_args(tiny_recipe, root, tmp_path / "r2"))
    assert code == 2 and "cannot read image" in output and "im1.png" in output
    shutil.rmtree(root / "labels")
    code, output = run_cli(*folder_args(tiny_recipe, root, tmp_path / "r3"))
    assert code == 2 and "have no label" in output


def test_folder_written_by_data_synth_trains(tiny_recipe, tmp_path):
    code, output = run_cli("data", "synth", "--out", str(tmp_path / "bench"), "--num-source", "8",
                           "--num-target-train", "6", "--num-target-val", "4", "--height", "32", "--width", "64")
    assert code == 0, output
    bench = tmp_path / "bench"
    args = ["run", str(tiny_recipe), "--out", str(tmp_path / "run"), "--set", "rounds.count=1"]
    for key, split in (("source", "source"), ("target", "target_train"), ("target_val", "target_val")):
        args += ["--set", f"data.{key}={{name: folder, root: {bench}, split: {split}}}"]
    code, output = run_cli(*args)
    assert code == 0, output
    rec = records(tmp_path / "run")[1]
    assert rec["pseudo"]["precision"] is not None  # target_train ground truth on disk is used for reporting


def test_gta2city_recipe_names_the_missing_path(tmp_path):
    code, output = run_cli("run", str(Path(__file__).parents[2] / "recipes" / "cbst_gta2city.yaml"),
                           "--out", str(tmp_path / "gta"))
    assert code == 2 and "data path data/gta5 does not exist" in output


def test_priors_build_cli(tiny_recipe, tmp_path):
    out = tmp_path / "priors" / "tiny.npz"
    code, output = run_cli("priors", "build", "--dataset", str(tiny_recipe), "--out", str(out), "--plot")
    assert code == 0, output
    assert out.is_file() and out.with_suffix(".png").is_file() and (out.parent / "MANIFEST.yaml").is_file()
    code, output = run_cli("run", str(tiny_recipe), "--out", str(tmp_path / "sp"), "--set", "policy.name=cbst_sp",
                           "--set", f"policy.prior={out}", "--set", "rounds.count=1")
    assert code == 0, output
    code, output = run_cli("run", str(tiny_recipe), "--out", str(tmp_path / "sp2"), "--set", "policy.name=cbst_sp",
                           "--set", f"policy.prior={out}", "--set", "data.num_classes=9",
                           "--set", "data.class_names=[a,b,c,d,e,f,g,h,i]")
    assert code == 2


def test_diverging_run_stops_with_the_loss_components(tiny_recipe, tmp_path):
    code, output = run_cli("run", str(tiny_recipe), "--out", str(tmp_path / "run"), "--set", "rounds.count=0",
                           "--set", "source_training.optim.lr=1.0e+30", "--set", "source_training.lr_schedule=constant")
    assert code == 1 and "non-finite loss" in output and "src/ce=" in output


def test_list_and_evaluate(tiny_recipe, tmp_path):
    code, output = run_cli("list", "policies")
    assert code == 0 and [line.split()[0] for line in output.splitlines()] == [
        "cbst", "cbst_sp", "det_st", "mean_teacher", "st", "st_sp", "wst"]
    assert "wst  (detection, online)" in output and "mean_teacher  (segmentation, detection, online)" in output
    code, output = run_cli("list", "adapters")
    assert code == 0 and "tiny_ssd  (detection)" in output and "deeplabv2  (segmentation)" in output
    out = tmp_path / "run"
    assert run_cli("run", str(tiny_recipe), "--out", str(out), "--set", "rounds.count=0")[0] == 0
    code, output = run_cli("evaluate", str(tiny_recipe), "--checkpoint", str(out / "checkpoints" / "last.pt"))
    assert code == 0 and "mIoU" in output
    code, output = run_cli("evaluate", str(tiny_recipe), "--checkpoint", str(tmp_path / "none.pt"))
    assert code == 2 and "does not exist" in output


def test_divergence_stops_before_the_round_is_checkpointed(tiny_recipe, tmp_path):
    """SGD at a learning rate of 1e6 reaches losses of 1e16 in round 1 without a NaN: the guard stops
    the round at the jump, so round 1 is never checkpointed nor recorded."""
    out = tmp_path / "run"
    code, output = run_cli("run", str(tiny_recipe), "--out", str(out), "--set", "rounds.optim.lr=1.0e+6")
    assert code == 1
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in output
    assert "loss diverged at step " in errors[0] and "(round 1: fine-tune)" in errors[0] and "src/ce=" in errors[0]
    assert errors[0].endswith("lower the learning rate or check the labels")
    assert (out / "checkpoints" / "round_000.pt").is_file() and not (out / "checkpoints" / "round_001.pt").exists()
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=False)["round"] == 0
    assert [r["round"] for r in records(out)] == [0]
