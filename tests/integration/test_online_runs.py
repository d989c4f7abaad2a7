"""Online policies end to end on tiny models: detection (det_st, wst, mean teacher) and the
segmentation mean teacher; stored labels, metrics, resume equivalence, recipe errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from selftrain.build import build_target_dataset
from selftrain.cli import main
from selftrain.config import load_recipe
from selftrain.store import open_round


def run_cli(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("policy", ["det_st", "wst", "mean_teacher"])
def test_detection_policies_run_and_store_boxes(det_tiny_recipe, tmp_path, policy):
    out = tmp_path / policy
    code, text, err = run_cli("run", det_tiny_recipe, "--set", f"policy.name={policy}", "--set",
                              "policy.options={threshold: 0.0}" if policy != "det_st" else "policy.options={}",
                              "--out", out, "--quiet")
    assert code == 0, err
    recs = records(out)
    assert [r["round"] for r in recs] == [0, 1, 2] and all("map" in r["eval"] for r in recs)
    assert len(recs[0]["eval"]["ap"]) == 6 and "tgt/cls" in recs[1]["losses"]
    with open_round(out / "pseudo" / "round_002.h5") as reader:
        assert reader.task == "detection" and len(reader) == 10 and reader.meta["policy"] == policy
        found = [reader.boxes(i) for i in range(len(reader))]
        total = sum(len(f["labels"]) for f in found)
        assert recs[2]["pseudo"]["selected_boxes"] == np.bincount(
            np.concatenate([f["labels"] for f in found]).astype(int) - 1, minlength=6).tolist()
        pseudo = recs[2]["pseudo"]  # the synthetic target has ground truth: precision is reported
        assert [p is None for p in pseudo["precision"]] == [n == 0 for n in pseudo["selected_boxes"]]
        assert "selected_pixels" not in pseudo and "thresholds" not in pseudo and isinstance(pseudo["threshold"], float)
        assert (pseudo["precision_overall"] is None) == (total == 0)
        assert all(0.0 <= p <= 1.0 for p in pseudo["precision"] if p is not None)
        if policy == "wst":  # threshold 0: every final detection is kept, with its SRRS
            assert total > 0 and all(np.isfinite(f["srrs"]).all() for f in found)
        else:
            assert all(np.isnan(f["srrs"]).all() for f in found)
        # what the threshold saw: every final detection's SRRS (wst) or score, and how many reach epsilon
        selection = pseudo["selection"]
        assert selection["criterion"] == ("srrs" if policy == "wst" else "score")
        assert selection["candidates"] == ("per_class" if policy == "wst" else None)
        assert selection["epsilon"] == (0.9 if policy == "det_st" else 0.0)
        assert selection["at_least_epsilon"] == total <= selection["detections"]
        q = selection["quantiles"]
        assert 0.0 <= q["p50"] <= q["p90"] <= q["p99"] <= q["max"] <= 1.0
        if policy == "wst":
            srrs = np.concatenate([f["srrs"] for f in found])
            assert selection["detections"] == total and q["max"] == pytest.approx(float(srrs.max()), abs=1e-6)
    ckpt = torch.load(out / "checkpoints" / "round_002.pt", weights_only=False)
    assert (ckpt["teacher"] is not None and "model" in ckpt["teacher"]) == (policy == "mean_teacher")


def test_online_resume_equals_an_uninterrupted_run(det_tiny_recipe, resumed):
    full, part = resumed(det_tiny_recipe, ["--set", "policy.name=mean_teacher", "--set",
                                           "policy.options={threshold: 0.0, decay: 0.9}", "--quiet"])
    a = torch.load(full / "checkpoints" / "round_002.pt", weights_only=False)
    b = torch.load(part / "checkpoints" / "round_002.pt", weights_only=False)
    for key in a["teacher"]["model"]:
        assert torch.equal(a["teacher"]["model"][key], b["teacher"]["model"][key]), key


def test_segmentation_mean_teacher(tiny_recipe, tmp_path):
    out = tmp_path / "mt"
    code, _, err = run_cli("run", tiny_recipe, "--set", "policy.name=mean_teacher", "--set",
                           "policy.options={threshold: 0.14}", "--out", out, "--quiet")
    assert code == 0, err
    recs = records(out)
    assert recs[2]["phase"] == "online" and math.isfinite(recs[2]["eval"]["miou"]) and "tgt/ce" in recs[1]["losses"]
    with open_round(out / "pseudo" / "round_001.h5") as reader:
        labels = np.stack([reader.labels(i) for i in range(len(reader))])
        conf = np.stack([reader.confidence(i) for i in range(len(reader))])
    assert 0.1 < (labels == 255).mean() < 0.9  # the tiny model's confidence is about 0.14 everywhere
    assert ((labels == 255) == (conf < 0.14)).mean() > 0.99  # float16 rounding at the threshold aside
    target, _ = build_target_dataset(load_recipe(out / "config.yaml"))  # precision against the ground truth
    truth = np.stack([target.ground_truth(i) for i in range(len(target))])
    kept = labels != 255
    assert recs[1]["pseudo"]["precision_overall"] == pytest.approx((labels[kept] == truth[kept]).mean(), abs=1e-9)


@pytest.mark.parametrize("setting, message", [
    (["policy.name=cbst"], "does not work for detection"),
    (["policy.name=wst", "policy.options={bogus: 1}"], "policy.options do not fit"),
    (["model.name=tiny_seg", "model.options={}"], "segmentation model"),
    (["model.options.srrs_candidates=all"], "srrs_candidates must be one of per_class, any_class"),
])
def test_detection_recipe_errors(det_tiny_recipe, tmp_path, setting, message):
    args = [a for s in setting for a in ("--set", s)]
    code, _, err = run_cli("run", det_tiny_recipe, *args, "--out", tmp_path / "x")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_data_synth_detection_writes_a_voc_layout(tmp_path):
    from selftrain.data.detsets import build_det_dataset
    from selftrain.data.synth_det import CLASS_NAMES

    code, out, err = run_cli("data", "synth", "--task", "detection", "--out", tmp_path / "b", "--num-source", 3,
                             "--num-target-train", 2, "--num-target-val", 2)
    assert code == 0, err
    ds = build_det_dataset("voc", root=str(tmp_path / "b"), split="target_val", options={}, class_names=CLASS_NAMES)
    assert len(ds) == 2 and ds[0]["image"].shape == (3, 128, 128) and len(ds[0]["boxes"]) >= 1


def test_detection_labels_show_and_export(det_tiny_recipe, tmp_path):
    import math
    import xml.etree.ElementTree as ET

    from PIL import Image

    out = tmp_path / "run"
    assert run_cli("run", det_tiny_recipe, "--set", "policy.options={threshold: 0.0}", "--set", "rounds.count=1",
                   "--out", out, "--quiet")[0] == 0
    code, _, err = run_cli("labels", "show", out, "--round", 1, "--grid", 2, "--out", tmp_path / "boxes.png")
    assert code == 0, err
    with Image.open(tmp_path / "boxes.png") as sheet:
        assert sheet.width > 200
    with open_round(out / "pseudo" / "round_001.h5") as reader:
        found = [reader.boxes(i) for i in range(len(reader))]
        ids = list(reader.image_ids)
    code, _, err = run_cli("labels", "export", out, "--round", 1, "--format", "coco", "--out", tmp_path / "coco")
    assert code == 0, err
    doc = json.loads((tmp_path / "coco" / "annotations" / "instances_train.json").read_text())
    assert len(doc["images"]) == 10 and len(doc["annotations"]) == sum(len(f["labels"]) for f in found)
    assert doc["images"][0]["width"] == 128 and [c["name"] for c in doc["categories"]][0] == "car"
    first = next(i for i, f in enumerate(found) if len(f["labels"]))
    ann = next(a for a in doc["annotations"] if a["image_id"] == first + 1)
    x0, y0, x1, y1 = found[first]["boxes"][0].tolist()
    assert ann["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=1e-4)
    code, _, err = run_cli("labels", "export", out, "--round", 1, "--format", "voc", "--out", tmp_path / "voc")
    assert code == 0, err
    root = ET.parse(tmp_path / "voc" / "Annotations" / f"{ids[first]}.xml").getroot()
    assert len(root.findall("object")) == len(found[first]["labels"])
    assert int(root.find("object/bndbox/xmin").text) == math.floor(x0 + 0.5) + 1
    assert (tmp_path / "voc" / "JPEGImages" / root.findtext("filename")).is_file()


def test_list_datasets_names_both_tasks():
    code, out, _ = run_cli("list", "datasets")
    assert code == 0 and "cityscapes  (segmentation)" in out and "voc  (detection)" in out
    assert "synth_shapes  (detection)" in out and "gta5  (segmentation)" in out
