"""`selftrain labels export` read back: by selftrain's own readers (exactly the stored pseudo-labels) and by
the third-party readers users feed the exports to (pycocotools, torchvision, a VOC devkit-style parser,
cityscapesscripts' evaluator).

Runs are made without training: a resolved recipe as config.yaml and a round file written with
PseudoLabelWriter, whose ids are those of the recipe's target set (synthetic, or a tiny copy of a real
data set in its official layout)."""

from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import DET_TINY, REPO, TINY
from det_layouts import write_voc
from layouts import write_cityscapes
from selftrain.cli import main
from selftrain.config import load_recipe, to_yaml
from selftrain.data.synth import CLASS_NAMES as STREET_CLASSES
from selftrain.data.synth_det import CLASS_NAMES as SHAPE_CLASSES
from selftrain.store import PseudoLabelWriter, RoundMeta, open_round


def run_cli(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def export(run: Path, fmt: str, out: Path, *extra) -> tuple[int, str, str]:
    """``selftrain labels export RUN --round 1 --format FMT --out OUT ...``"""
    return run_cli("labels", "export", run, "--round", 1, "--format", fmt, "--out", out, *extra)


def make_run(folder: Path, recipe: str, defaults: str, overrides: list[str]) -> tuple[Path, object]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(recipe.format(defaults=REPO / "recipes" / defaults))
    cfg = load_recipe(folder / "recipe.yaml", overrides)
    run = folder / "run"
    (run / "pseudo").mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    return run, cfg


def detection_round(run: Path, ids: list[str], size: tuple[int, int], class_names, seed: int = 0) -> None:
    """Random float boxes inside the image (0 to 3 per image, the first image empty) and, on the second
    image, the whole image, a box thinner than half a pixel and one with half-pixel edges."""
    rng, (h, w) = np.random.default_rng(seed), size
    with PseudoLabelWriter(run / "pseudo" / "round_001.h5", RoundMeta(task="detection", round=1, policy="wst",
                                                                      portion=1.0, num_classes=len(class_names),
                                                                      class_names=list(class_names))) as writer:
        for k, image_id in enumerate(ids):
            n = k % 4
            x0, y0 = rng.uniform(0, w - 2, n), rng.uniform(0, h - 2, n)
            boxes = np.stack([x0, y0, rng.uniform(x0 + 0.6, w), rng.uniform(y0 + 0.6, h)], 1).reshape(-1, 4)
            if k == 1:
                boxes = np.concatenate([boxes, [[0, 0, w, h], [5.2, 7.1, 5.4, 7.3], [0.5, 1.5, 10.5, 11.5]]])
            m = len(boxes)
            srrs = np.where(np.arange(m) % 2 == 0, np.nan, rng.uniform(0, 1, m))
            writer.add_detection(image_id, boxes.astype(np.float32), rng.integers(1, len(class_names) + 1, m),
                                 rng.uniform(0, 1, m).astype(np.float32), srrs.astype(np.float32))
        writer.finish()


def stored(run: Path) -> dict[str, dict[str, np.ndarray]]:
    with open_round(run / "pseudo" / "round_001.h5") as reader:
        if reader.task == "detection":
            return {image_id: reader.boxes(i) for i, image_id in enumerate(reader.image_ids)}
        return {image_id: reader.labels(i) for i, image_id in enumerate(reader.image_ids)}


def rounded(box, size) -> list[int]:
    """VOC pixel edges of one continuous box, edge by edge: nearest boundary (halves up), inside the image,
    at least one pixel; the export's documented rule, written independently of it."""
    h, w = size
    e = [min(max(math.floor(float(v) + 0.5), 0), limit) for v, limit in zip(box, (w, h, w, h))]
    e[0], e[1] = min(e[0], w - 1), min(e[1], h - 1)
    e[2], e[3] = max(e[2], e[0] + 1), max(e[3], e[1] + 1)
    return e


def per_class(labels_by_image, num_classes: int) -> list[int]:
    every = np.concatenate([np.asarray(v, np.int64).reshape(-1) for v in labels_by_image] or [np.zeros(0, int)])
    return np.bincount(every, minlength=num_classes + 1)[1:].tolist()


# --- reference: the VOC devkit's Python port (py-faster-rcnn lib/datasets/voc_eval.py, parse_rec) --------
# Written from its known behaviour: every object must have name, pose, truncated, difficult and an
# integer bndbox (int() of the text), else it fails with AttributeError or ValueError.
def parse_rec(filename):
    tree = ET.parse(filename)
    objects = []
    for obj in tree.findall("object"):
        obj_struct = {}
        obj_struct["name"] = obj.find("name").text
        obj_struct["pose"] = obj.find("pose").text
        obj_struct["truncated"] = int(obj.find("truncated").text)
        obj_struct["difficult"] = int(obj.find("difficult").text)
        bbox = obj.find("bndbox")
        obj_struct["bbox"] = [int(bbox.find("xmin").text), int(bbox.find("ymin").text),
                              int(bbox.find("xmax").text), int(bbox.find("ymax").text)]
        objects.append(obj_struct)
    return objects


# --------------------------------------------------------------------------- runs
SHAPE_IDS = [f"target_train_{i:05d}" for i in range(10)]
STREET_IDS = [f"target_train_{i:05d}" for i in range(12)]


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory) -> Path:
    run, _ = make_run(tmp_path_factory.mktemp("shapes"), DET_TINY, "det_defaults.yaml", [])
    detection_round(run, SHAPE_IDS, (128, 128), SHAPE_CLASSES)
    return run


@pytest.fixture(scope="module")
def voc_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vocdata")
    write_voc(folder / "VOCdevkit")
    run, _ = make_run(folder, DET_TINY, "det_defaults.yaml",
                      [f"data.target={{name: voc, root: {folder / 'VOCdevkit'}, split: trainval}}"])
    detection_round(run, ["000001", "000002", "000003"], (24, 32), SHAPE_CLASSES, seed=1)
    return run


@pytest.fixture(scope="module")
def street_run(tmp_path_factory) -> Path:
    run, _ = make_run(tmp_path_factory.mktemp("street"), TINY, "defaults.yaml", [])
    rng = np.random.default_rng(2)
    with PseudoLabelWriter(run / "pseudo" / "round_001.h5", RoundMeta(task="segmentation", round=1, policy="cbst",
                                                                      portion=0.5, num_classes=10,
                                                                      class_names=list(STREET_CLASSES))) as writer:
        for image_id in STREET_IDS:
            labels = np.where(rng.uniform(size=(32, 64)) < 0.3, 255, rng.integers(0, 10, (32, 64))).astype(np.uint8)
            writer.add_segmentation(image_id, labels, rng.uniform(size=(32, 64)).astype(np.float32))
        writer.finish(thresholds=np.full(10, 0.5, np.float32))
    return run


@pytest.fixture(scope="module")
def cityscapes_run(tmp_path_factory):
    from selftrain.data.segsets import cityscapes_names

    folder = tmp_path_factory.mktemp("csdata")
    written = write_cityscapes(folder / "cityscapes", splits={"train": 3}, size=(32, 64), foggy=False)
    run, _ = make_run(folder, TINY, "defaults.yaml", [
        f"data.target={{name: cityscapes, root: {folder / 'cityscapes'}, split: train}}",
        "data.num_classes=19", "data.class_names=null"])
    rng = np.random.default_rng(3)
    with PseudoLabelWriter(run / "pseudo" / "round_001.h5", RoundMeta(task="segmentation", round=1, policy="cbst",
                                                                      portion=0.5, num_classes=19,
                                                                      class_names=list(cityscapes_names()))) as writer:
        for image_id in written.ids["train"]:
            labels = np.where(rng.uniform(size=(32, 64)) < 0.3, 255, rng.integers(0, 19, (32, 64))).astype(np.uint8)
            writer.add_segmentation(image_id, labels, rng.uniform(size=(32, 64)).astype(np.float32))
        writer.finish(thresholds=np.full(19, 0.5, np.float32))
    return run, written


# --------------------------------------------------------------------------- VOC
def test_voc_export_of_rendered_images_reads_back(shapes_run, tmp_path):
    from selftrain.data.detsets import build_det_dataset

    out = tmp_path / "voc"
    code, text, err = export(shapes_run, "voc", out)
    assert code == 0, err
    assert "wrote 10 images of round 1 as voc" in text
    assert (out / "ImageSets" / "Main" / "train.txt").read_text().split() == SHAPE_IDS
    truth = stored(shapes_run)
    ds = build_det_dataset("voc", root=str(out), split="train", options={}, class_names=SHAPE_CLASSES)
    assert ds.ids == SHAPE_IDS
    for i, image_id in enumerate(ds.ids):
        sample = ds[i]  # decodes the JPEG written from the rendered image and checks its size against the XML
        assert sample["image"].shape == (3, 128, 128)
        assert sample["boxes"].tolist() == [rounded(b, (128, 128)) for b in truth[image_id]["boxes"]]
        assert sample["labels"].tolist() == truth[image_id]["labels"].tolist()
        root = ET.parse(out / "Annotations" / f"{image_id}.xml").getroot()
        assert (out / "JPEGImages" / root.findtext("filename")).is_file()
        scores = [np.float32(o.findtext("score")) for o in root.findall("object")]
        assert np.array_equal(np.array(scores, np.float32), truth[image_id]["scores"])
    thin = ds.ground_truth(1)["boxes"][-2].tolist()
    assert thin == [5, 7, 6, 8] and len(truth[SHAPE_IDS[1]]["labels"]) == 4  # thinner than half a pixel: one kept


def test_voc_export_passes_the_devkit_parser_with_the_same_counts(shapes_run, tmp_path):
    out = tmp_path / "voc"
    assert export(shapes_run, "voc", out, "--images", "none")[0] == 0
    assert not (out / "JPEGImages").exists()
    truth = stored(shapes_run)
    names = (out / "ImageSets" / "Main" / "train.txt").read_text().split()
    recs = {name: parse_rec(out / "Annotations" / f"{name}.xml") for name in names}
    counts = [sum(o["name"] == c for objs in recs.values() for o in objs) for c in SHAPE_CLASSES]
    assert counts == per_class([t["labels"] for t in truth.values()], len(SHAPE_CLASSES))
    assert recs[SHAPE_IDS[1]][-3]["bbox"] == [1, 1, 128, 128]
    assert all(o["pose"] == "Unspecified" and o["truncated"] == 0 and o["difficult"] == 0
               for objs in recs.values() for o in objs)
    root = ET.parse(out / "Annotations" / f"{SHAPE_IDS[1]}.xml").getroot()
    assert root.findtext("folder") == "voc" and root.findtext("filename") == f"{SHAPE_IDS[1]}.jpg"
    assert root.findtext("source/database") and root.findtext("size/width") == "128"


def test_voc_export_opens_in_torchvision(shapes_run, tmp_path):
    from torchvision.datasets import VOCDetection

    out = tmp_path / "tv" / "VOCdevkit" / "VOC2012"
    assert export(shapes_run, "voc", out)[0] == 0
    ds = VOCDetection(str(tmp_path / "tv"), year="2012", image_set="train")
    truth = stored(shapes_run)
    assert len(ds) == 10
    for k in range(len(ds)):
        image, target = ds[k]
        objects = target["annotation"].get("object", [])
        assert image.size == (128, 128) and len(objects) == len(truth[SHAPE_IDS[k]]["labels"])


def test_voc_export_of_a_real_data_set_links_its_images(voc_run, tmp_path):
    from torchvision.datasets import VOCDetection

    from selftrain.data.detsets import build_det_dataset

    out = tmp_path / "tv" / "VOCdevkit" / "VOC2012"
    assert export(voc_run, "voc", out)[0] == 0
    source = voc_run.parent / "VOCdevkit" / "VOC2007" / "JPEGImages" / "000001.jpg"
    assert os.path.islink(out / "JPEGImages" / "000001.jpg")
    assert Path(os.readlink(out / "JPEGImages" / "000001.jpg")) == source.absolute()
    assert ET.parse(out / "Annotations" / "000001.xml").getroot().findtext("filename") == "000001.jpg"
    truth = stored(voc_run)
    ds = build_det_dataset("voc", root=str(out), split="train", options={}, class_names=SHAPE_CLASSES)
    for i, image_id in enumerate(ds.ids):
        gt = ds.ground_truth(i)
        expected = [rounded(b, (24, 32)) for b in truth[image_id]["boxes"]]
        assert gt["boxes"].tolist() == expected and gt["labels"].tolist() == truth[image_id]["labels"].tolist()
    original = build_det_dataset("voc", root=str(voc_run.parent / "VOCdevkit"), split="trainval", options={},
                                 class_names=SHAPE_CLASSES)
    assert np.array_equal(ds[0]["image"].numpy(), original[0]["image"].numpy())
    tv = VOCDetection(str(tmp_path / "tv"), year="2012", image_set="train")
    objects = [len(tv[k][1]["annotation"].get("object", [])) for k in range(3)]
    assert objects == [len(truth[i]["labels"]) for i in ds.ids]


# --------------------------------------------------------------------------- COCO
def test_coco_export_reads_back_exactly(shapes_run, tmp_path):
    from pycocotools.coco import COCO
    from torchvision.datasets import CocoDetection as TorchCoco

    from selftrain.data import synth_det
    from selftrain.data.detsets import build_det_dataset

    out = tmp_path / "coco"
    assert export(shapes_run, "coco", out, "--images", "copy")[0] == 0
    ann_file = out / "annotations" / "instances_train.json"
    doc = json.loads(ann_file.read_text())
    assert doc["info"]["image_root"] == str((out / "train").absolute()) and doc["licenses"]
    assert [im["file_name"] for im in doc["images"]] == [f"{i}.png" for i in SHAPE_IDS]
    truth = stored(shapes_run)
    coco = COCO(str(ann_file))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SHAPE_CLASSES)
    assert coco.getCatIds() == list(range(1, 7))
    assert [len(coco.getAnnIds(catIds=[k])) for k in range(1, 7)] == per_class(
        [t["labels"] for t in truth.values()], 6)
    for image in coco.loadImgs(coco.getImgIds()):
        pixels = np.asarray(Image.open(Path(doc["info"]["image_root"]) / image["file_name"]))
        index = int(image["file_name"][len("target_train_"):-len(".png")])
        assert np.array_equal(pixels, synth_det.render("target_train", index, seed=0).image)  # lossless PNG
    ds = build_det_dataset("coco", root=str(out), split="train", options={}, class_names=SHAPE_CLASSES)
    assert ds.ids == SHAPE_IDS
    for i, image_id in enumerate(ds.ids):
        sample = ds[i]
        assert np.array_equal(sample["boxes"].numpy(), truth[image_id]["boxes"])  # float32, exactly
        assert np.array_equal(sample["labels"].numpy(), truth[image_id]["labels"])
    scores = np.array([a["score"] for a in doc["annotations"]], np.float32)
    assert np.array_equal(scores, np.concatenate([truth[i]["scores"] for i in SHAPE_IDS]))
    tv = TorchCoco(doc["info"]["image_root"], str(ann_file))
    assert len(tv) == 10 and [len(tv[k][1]) for k in range(10)] == [len(truth[i]["labels"]) for i in SHAPE_IDS]


def test_coco_scores_evaluate_in_pycocotools(shapes_run, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out = tmp_path / "coco"
    assert export(shapes_run, "coco", out, "--images", "none")[0] == 0
    doc = json.loads((out / "annotations" / "instances_train.json").read_text())
    assert doc["info"]["image_root"] is None and not (out / "train").exists()
    gt = COCO(str(out / "annotations" / "instances_train.json"))
    evaluation = COCOeval(gt, gt.loadRes(doc["annotations"]), "bbox")  # the pseudo-labels scored against themselves
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)


def test_coco_file_names_are_relative_to_the_data_set_root(voc_run, tmp_path):
    from selftrain.data.detsets import build_det_dataset

    data_root = (voc_run.parent / "VOCdevkit").absolute()
    out = tmp_path / "coco"
    assert export(voc_run, "coco", out, "--images", "none")[0] == 0
    doc = json.loads((out / "annotations" / "instances_train.json").read_text())
    assert doc["info"]["image_root"] == str(data_root)
    assert [im["file_name"] for im in doc["images"]] == [f"VOC2007/JPEGImages/00000{k}.jpg" for k in (1, 2, 3)]
    assert [(im["height"], im["width"]) for im in doc["images"]] == [(24, 32)] * 3
    ds = build_det_dataset("coco", root=str(out), split="train", options={"image_root": str(data_root)},
                           class_names=SHAPE_CLASSES)
    truth = stored(voc_run)
    for i, image_id in enumerate(["000001", "000002", "000003"]):
        assert ds.ids[i] == f"VOC2007/JPEGImages/{image_id}"
        assert np.array_equal(ds[i]["boxes"].numpy(), truth[image_id]["boxes"])
    linked = tmp_path / "linked"
    assert export(voc_run, "coco", linked)[0] == 0
    assert os.path.islink(linked / "train" / "VOC2007" / "JPEGImages" / "000001.jpg")
    again = build_det_dataset("coco", root=str(linked), split="train", options={}, class_names=SHAPE_CLASSES)
    assert again.ids == ds.ids


# --------------------------------------------------------------------------- segmentation
def test_png_export_reads_back_with_the_folder_data_set(street_run, tmp_path):
    from selftrain.data import synth
    from selftrain.data.datasets import build_dataset, to_image

    out = tmp_path / "png"
    assert export(street_run, "png", out, "--images", "copy")[0] == 0
    ds = build_dataset("folder", root=str(out), split="", options={}, num_classes=10, ignore_index=255)
    truth = stored(street_run)
    assert ds.ids == STREET_IDS and ds.image_path(0) == out / "images" / f"{STREET_IDS[0]}.png"
    assert not (out / "images" / f"{STREET_IDS[0]}.png").is_symlink()
    for i, image_id in enumerate(ds.ids):
        sample = ds[i]
        assert np.array_equal(sample["label"].numpy(), truth[image_id])
        rendered = synth.render("target_train", i, seed=0, height=32, width=64)[0]
        assert np.array_equal(to_image(sample["image"]), rendered)


def test_cityscapes_export_of_rendered_images_reads_back(street_run, tmp_path):
    from selftrain.data.datasets import build_dataset
    from selftrain.data.segsets import cityscapes_names

    out = tmp_path / "cs"
    assert export(street_run, "cityscapes", out)[0] == 0
    ds = build_dataset("cityscapes", root=str(out), split="train", options={}, num_classes=19, ignore_index=255)
    assert ds.ids == [f"synth_street/{i}" for i in STREET_IDS]
    truth = stored(street_run)
    names = np.array([*cityscapes_names(), *["-"] * 237])  # train id -> name, 255 -> "-"
    ours = np.array([n.replace("_", " ") for n in STREET_CLASSES] + ["-"] * 246)
    for i, image_id in enumerate(STREET_IDS):
        assert np.array_equal(names[ds[i]["label"].numpy()], ours[truth[image_id]])


def test_cityscapes_export_reads_back_and_passes_the_official_evaluator(cityscapes_run, tmp_path, monkeypatch):
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as ev
    from cityscapesscripts.helpers.labels import trainId2label

    from selftrain.data.datasets import build_dataset

    run, written = cityscapes_run
    out = tmp_path / "cs"
    assert export(run, "cityscapes", out)[0] == 0
    ds = build_dataset("cityscapes", root=str(out), split="train", options={}, num_classes=19, ignore_index=255)
    truth = stored(run)
    assert ds.ids == written.ids["train"]
    city, stem = ds.ids[0].split("/")
    image = out / "leftImg8bit" / "train" / city / f"{stem}_leftImg8bit.png"
    assert ds.image_path(0) == image and image.resolve() == (written.root / "leftImg8bit" / "train" / city /
                                                            f"{stem}_leftImg8bit.png").resolve()
    for i, image_id in enumerate(ds.ids):
        assert np.array_equal(ds[i]["label"].numpy(), truth[image_id])  # label ids -> train ids: exactly the round
    for name, value in (("predictionPath", str(out / "gtFine" / "train")), ("predictionWalk", None),
                        ("evalInstLevelScore", False), ("JSONOutput", False), ("quiet", True)):
        monkeypatch.setattr(ev.args, name, value, raising=False)
    gt_files = sorted(str(p) for p in (written.root / "gtFine" / "train").glob("*/*_gtFine_labelIds.png"))
    predictions = [ev.getPrediction(ev.args, g) for g in gt_files]
    assert [Path(p).name for p in predictions] == [Path(g).name for g in gt_files]
    result = ev.evaluateImgLists(predictions, gt_files, ev.args)
    to_id = np.zeros(256, np.int64)
    for train_id in range(19):
        to_id[train_id] = trainId2label[train_id].id
    expected = np.bincount(np.concatenate([to_id[truth[i]].ravel() for i in ds.ids]), minlength=34)
    assert np.asarray(result["confMatrix"]).sum(axis=0)[:34].tolist() == expected.tolist()


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args, message", [
    (["--format", "yolo"], "--format 'yolo' is unknown"),
    (["--format", "png"], "--format png does not fit detection pseudo-labels; use one of: voc, coco"),
    (["--format", "voc", "--images", "hard"], "--images 'hard' is unknown"),
    (["--format", "voc", "--round", "7"], "round 7 has no pseudo-label file"),
    (["--format", "voc", "--split", "a/b"], "--split 'a/b' is not a plain name"),
])
def test_bad_input_is_one_line_and_writes_nothing(shapes_run, tmp_path, args, message):
    base = ["labels", "export", shapes_run, "--out", tmp_path / "out"]
    if "--round" not in args:
        base += ["--round", 1]
    code, _, err = run_cli(*base, *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_the_export_folder_is_never_mixed(shapes_run, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    code, _, err = export(shapes_run, "voc", mine, "--overwrite")
    assert code == 2 and "not a selftrain export" in err and [p.name for p in mine.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    code, _, err = export(shapes_run, "voc", tmp_path / "file" / "x")
    assert code == 2 and "cannot create the export folder" in err and len(err.strip().splitlines()) == 1
    out = tmp_path / "out"
    assert export(shapes_run, "voc", out, "--images", "none")[0] == 0
    code, _, err = export(shapes_run, "coco", out)
    assert code == 2 and "holds an earlier export (voc of round 1); pass --overwrite" in err
    assert (out / "Annotations").is_dir()
    assert export(shapes_run, "coco", out, "--overwrite")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["annotations", "selftrain_export.json", "train"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "mine", "out"]  # no staging folder left behind


def test_missing_target_data_is_one_line(voc_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(voc_run, run)
    cfg = (run / "config.yaml").read_text().replace(str(voc_run.parent / "VOCdevkit"), str(tmp_path / "gone"))
    (run / "config.yaml").write_text(cfg)
    code, _, err = export(run, "voc", tmp_path / "out")
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
