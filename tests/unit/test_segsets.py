"""The real data sets on tiny copies of their official layouts (tests/layouts.py)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.labels import labels as CS_LABELS
from layouts import write_bdd100k, write_cityscapes, write_gta5, write_nthu, write_synthia
from PIL import Image

from selftrain.data.cityscapes import CITYSCAPES_TO_NTHU, CITYSCAPES_TO_SYNTHIA, NTHU_13_NAMES
from selftrain.data.datasets import DATASETS, build_dataset
from selftrain.data.segsets import (SYNTHIA_13, SYNTHIA_16_NAMES, SYNTHIA_RAW_NAMES, SYNTHIA_TO_16, cityscapes_lut,
                                    cityscapes_names, miou_subset)
from selftrain.errors import DataError
from selftrain.metrics import ConfusionMatrix, miou

# Label id -> train id straight from the official table, independent of the lookup table under test.
CS_TRAIN_ID = {lab.id: (lab.trainId if 0 <= lab.trainId < 255 else 255) for lab in CS_LABELS if lab.id >= 0}


def official(raw: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda v: CS_TRAIN_ID.get(int(v), 255))(raw).astype(np.int64)


def build(name, root, split="", **options):
    return build_dataset(name, root=str(root), split=split, options=options, num_classes=19, ignore_index=255)


# ---------------------------------------------------------------------------------------------
# Cityscapes and Foggy Cityscapes


def test_cityscapes_lut_follows_the_official_table():
    lut = cityscapes_lut()
    assert lut[7] == 0 and lut[8] == 1 and lut[26] == 13 and lut[33] == 18  # road, sidewalk, car, bicycle
    assert all(lut[i] == 255 for i in (0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30))  # void, parking, ...
    assert all(lut[i] == 255 for i in range(34, 256))
    names = cityscapes_names()
    assert len(names) == 19 and names[0] == "road" and names[13] == "car" and names[18] == "bicycle"
    for lab in CS_LABELS:
        if 0 <= lab.id and 0 <= lab.trainId < 19:
            assert names[lut[lab.id]] == lab.name


def test_cityscapes_ids_and_labels(tmp_path):
    written = write_cityscapes(tmp_path, splits={"train": 3, "val": 2})
    ds = build("cityscapes", tmp_path, "train")
    assert ds.ids == written.ids["train"] == sorted(ds.ids)
    assert ds.ids[0] == "aachen/aachen_000000_000019" and len(ds.class_names) == 19
    for i, image_id in enumerate(ds.ids):
        sample = ds[i]
        assert sample["id"] == image_id and sample["image"].shape == (3, 32, 64)
        assert sample["image"].dtype == torch.float32 and sample["label"].dtype == torch.int64
        np.testing.assert_array_equal(sample["label"].numpy(), official(written.labels[image_id]))
        np.testing.assert_array_equal(ds.label(i), sample["label"].numpy())


def test_cityscapes_crafted_label_values(tmp_path):
    write_cityscapes(tmp_path, splits={"val": 1}, foggy=False)
    raw = np.zeros((32, 64), np.uint8)
    raw[0, :6] = [7, 26, 0, 1, 24, 33]
    Image.fromarray(raw).save(tmp_path / "gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_labelIds.png")
    label = build("cityscapes", tmp_path, "val")[0]["label"].numpy()
    assert label[0, :6].tolist() == [0, 13, 255, 255, 11, 18]


def test_label_reads_no_image(tmp_path):
    write_cityscapes(tmp_path, splits={"val": 1}, foggy=False)
    (tmp_path / "leftImg8bit/val/frankfurt/frankfurt_000000_000019_leftImg8bit.png").write_bytes(b"not a png")
    ds = build("cityscapes", tmp_path, "val")
    assert ds.label(0).shape == (32, 64)
    with pytest.raises(DataError, match="cannot read image"):
        ds[0]


def test_foggy_beta_selects_files_and_keeps_clear_ids(tmp_path):
    written = write_cityscapes(tmp_path, splits={"val": 2})
    clear = build("cityscapes", tmp_path, "val")
    images = {}
    for beta in (0.005, 0.01, 0.02):
        ds = build("foggy_cityscapes", tmp_path, "val", beta=beta)
        assert ds.ids == clear.ids == written.ids["val"]
        assert all(p.image.name.endswith(f"_leftImg8bit_foggy_beta_{beta}.png") for p in ds.pairs)
        np.testing.assert_array_equal(ds[0]["label"].numpy(), clear[0]["label"].numpy())
        images[beta] = ds[0]["image"]
    assert build("foggy_cityscapes", tmp_path, "val").beta == 0.02
    assert not torch.equal(images[0.005], images[0.02]) and not torch.equal(images[0.02], clear[0]["image"])
    with pytest.raises(DataError, match="beta 0.03 is unknown.*0.005, 0.01, 0.02"):
        build("foggy_cityscapes", tmp_path, "val", beta=0.03)


def test_list_file_selects_a_subset_in_the_file_order(tmp_path):
    written = write_cityscapes(tmp_path, splits={"train": 4}, foggy=False)
    ids = written.ids["train"]
    lst = tmp_path / "subset.txt"
    lst.write_text(f"# three of four\n{ids[3]}\n\nleftImg8bit/train/{ids[0]}_leftImg8bit.png\n"
                   f"{ids[1].split('/')[1]}\n")
    ds = build("cityscapes", tmp_path, "train", list_file=str(lst))
    assert ds.ids == [ids[3], ids[0], ids[1]]
    lst.write_text(f"{ids[0]}\n{ids[2]}\n{ids[0]}\n")
    with pytest.raises(DataError, match=f"names image {ids[0]} twice"):
        build("cityscapes", tmp_path, "train", list_file=str(lst))
    lst.write_text(f"{ids[0]}\naachen/aachen_999999_000019\n")
    with pytest.raises(DataError, match=r"names 1 ids that are not in cityscapes train.*aachen_999999_000019"):
        build("cityscapes", tmp_path, "train", list_file=str(lst))
    with pytest.raises(DataError, match="list_file .*missing.txt does not exist"):
        build("cityscapes", tmp_path, "train", list_file=str(tmp_path / "missing.txt"))


def test_cityscapes_errors(tmp_path):
    write_cityscapes(tmp_path, splits={"train": 2, "val": 1}, foggy=False)
    with pytest.raises(DataError, match="split 'training' is unknown.*'train', 'val', 'test'"):
        build("cityscapes", tmp_path, "training")
    with pytest.raises(DataError, match=f"cityscapes folder {tmp_path / 'leftImg8bit' / 'test'} does not exist"):
        build("cityscapes", tmp_path, "test")
    (tmp_path / "leftImg8bit/test/berlin").mkdir(parents=True)
    (tmp_path / "gtFine/test").mkdir(parents=True)
    with pytest.raises(DataError, match="no images in cityscapes test"):
        build("cityscapes", tmp_path, "test")
    missing = tmp_path / "gtFine/train/bochum/bochum_000001_000019_gtFine_labelIds.png"
    missing.unlink()
    pattern = f"1 images of cityscapes train .*bochum_000001_000019_leftImg8bit.png.*{missing}"
    with pytest.raises(DataError, match=pattern):
        build("cityscapes", tmp_path, "train")
    ds = build_dataset("cityscapes", root=str(tmp_path), split="train", options={}, num_classes=19,
                       ignore_index=255, with_labels=False)
    assert len(ds) == 2 and ds.label(1) is None and (ds[0]["label"] == 255).all()
    with pytest.raises(DataError, match="needs a root"):
        DATASETS.get("cityscapes")(root=None, split="train")


def test_class_count_and_ignore_index(tmp_path):
    write_cityscapes(tmp_path, splits={"val": 1}, foggy=False)
    with pytest.raises(DataError, match="out of range for 13 classes"):
        build_dataset("cityscapes", root=str(tmp_path), split="val", options={}, num_classes=13, ignore_index=255)[0]
    ds = build_dataset("cityscapes", root=str(tmp_path), split="val", options={}, num_classes=19, ignore_index=-1)
    label = ds[0]["label"].numpy()
    assert (label == -1).any() and not (label == 255).any()


def test_label_space_nthu_and_synthia_on_cityscapes(tmp_path):
    written = write_cityscapes(tmp_path, splits={"val": 2}, foggy=False)
    for space, table, names in (("nthu", CITYSCAPES_TO_NTHU, NTHU_13_NAMES),
                                ("synthia", CITYSCAPES_TO_SYNTHIA, SYNTHIA_16_NAMES)):
        ds = build_dataset("cityscapes", root=str(tmp_path), split="val", options={"label_space": space},
                           num_classes=len(names), ignore_index=255)
        assert ds.class_names == names
        merge = np.array([table.get(t, 255) for t in range(256)])
        expected = merge[official(written.labels[ds.ids[0]])]
        np.testing.assert_array_equal(ds[0]["label"].numpy(), expected)
    with pytest.raises(DataError, match="label_space 'kitti' is unknown"):
        build("cityscapes", tmp_path, "val", label_space="kitti")


@pytest.mark.parametrize("table,names,dropped", [
    (CITYSCAPES_TO_NTHU, NTHU_13_NAMES, {"wall", "fence", "pole", "terrain", "truck", "train"}),
    (CITYSCAPES_TO_SYNTHIA, SYNTHIA_16_NAMES, {"terrain", "truck", "train"}),
])
def test_merging_tables_class_by_class(table, names, dropped):
    source = cityscapes_names()
    assert sorted(table) == list(range(19))
    assert {source[s] for s, t in table.items() if t == 255} == dropped
    kept = [(s, t) for s, t in table.items() if t != 255]
    assert sorted(t for _, t in kept) == list(range(len(names)))
    for s, t in kept:
        assert source[s] == names[t], (s, t)


# ---------------------------------------------------------------------------------------------
# GTA5


class Records(logging.Handler):
    """Collects the records of one logger (caplog misses them once the CLI has set propagate off)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_gta5_skips_mismatched_pairs_with_one_warning(tmp_path):
    written = write_gta5(tmp_path, n=5, mismatched=2)
    logger, records = logging.getLogger("selftrain.data.segsets"), Records()
    logger.addHandler(records)
    try:
        ds = build("gta5", tmp_path)
    finally:
        logger.removeHandler(records)
    warnings = [r for r in records.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "00004, 00005" in warnings[0].getMessage()
    assert ds.ids == written.ids[""] == ["00001", "00002", "00003"] and written.skipped == ["00004", "00005"]
    for i, image_id in enumerate(ds.ids):
        np.testing.assert_array_equal(ds[i]["label"].numpy(), official(written.labels[image_id]))


def test_gta5_resize(tmp_path):
    write_gta5(tmp_path, n=2, size=(24, 40), mismatched=0)
    plain, small = build("gta5", tmp_path), build("gta5", tmp_path, resize=[12, 20])
    sample = small[0]
    assert sample["image"].shape == (3, 12, 20) and sample["label"].shape == (12, 20)
    # nearest neighbour: every value of the resized label is a value of the full-size one, never a blend
    full = plain[0]["label"].numpy()
    np.testing.assert_array_equal(sample["label"].numpy(), full[1::2, 1::2])
    assert small.label(0).shape == (12, 20)
    with pytest.raises(DataError, match=r"resize must be \[height, width\]"):
        build("gta5", tmp_path, resize=[12])


def test_gta5_has_no_splits(tmp_path):
    write_gta5(tmp_path, n=2, mismatched=0)
    with pytest.raises(DataError, match="gta5 split 'train' is unknown"):
        build("gta5", tmp_path, "train")
    with pytest.raises(DataError, match=f"gta5 folder {tmp_path / 'nowhere' / 'images'} does not exist"):
        DATASETS.get("gta5")(root=str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------------------
# SYNTHIA


def test_synthia_table_class_by_class():
    expected = {"road": "road", "sidewalk": "sidewalk", "building": "building", "wall": "wall", "fence": "fence",
                "pole": "pole", "traffic light": "traffic light", "traffic sign": "traffic sign",
                "vegetation": "vegetation", "sky": "sky", "pedestrian": "person", "rider": "rider", "car": "car",
                "bus": "bus", "motorcycle": "motorcycle", "bicycle": "bicycle"}
    mapped = {SYNTHIA_RAW_NAMES[raw]: SYNTHIA_16_NAMES[cls] for raw, cls in SYNTHIA_TO_16.items()}
    assert mapped == expected
    ignored = {SYNTHIA_RAW_NAMES[i] for i in SYNTHIA_RAW_NAMES if i not in SYNTHIA_TO_16}
    assert ignored == {"void", "parking-slot", "road-work", "terrain", "truck", "train", "lanemarking"}
    assert [SYNTHIA_16_NAMES[i] for i in SYNTHIA_13] == [n for n in SYNTHIA_16_NAMES
                                                          if n not in ("wall", "fence", "pole")]


def test_synthia_reads_the_first_channel(tmp_path):
    written = write_synthia(tmp_path, n=3)
    ds = build_dataset("synthia", root=str(tmp_path), split="", options={}, num_classes=16, ignore_index=255)
    assert ds.ids == written.ids[""] and ds.class_names == SYNTHIA_16_NAMES
    for i, image_id in enumerate(ds.ids):
        raw = written.labels[image_id]
        expected = np.vectorize(lambda v: SYNTHIA_TO_16.get(int(v), 255))(raw)
        np.testing.assert_array_equal(ds[i]["label"].numpy(), expected)
    Image.fromarray(written.labels[ds.ids[0]].astype(np.uint8)).save(tmp_path / "GT/LABELS" / f"{ds.ids[0]}.png")
    with pytest.raises(DataError, match="expected the 3-channel 16-bit PNG"):
        ds.label(0)


def test_miou_subset():
    iou = np.arange(16, dtype=np.float64) / 16
    iou[0] = np.nan
    assert miou_subset(iou, SYNTHIA_13) == pytest.approx(np.mean([iou[i] for i in SYNTHIA_13 if i != 0]))
    assert np.isnan(miou_subset(np.full(16, np.nan), SYNTHIA_13))


# ---------------------------------------------------------------------------------------------
# NTHU and BDD100K


def test_nthu_test_split_and_labels(tmp_path):
    written = write_nthu(tmp_path, city="Rio", n_train=2, n_test=3)
    ds = build_dataset("nthu", root=str(tmp_path), split="test", options={"city": "rio"}, num_classes=13,
                       ignore_index=255)
    assert ds.ids == written.ids["test"] and ds.class_names == NTHU_13_NAMES
    raw = written.labels[ds.ids[0]]
    label = ds[0]["label"].numpy()
    for label_id, cls in ((7, 0), (8, 1), (11, 2), (19, 3), (20, 4), (21, 5), (23, 6), (24, 7), (25, 8),
                          (26, 9), (28, 10), (32, 11), (33, 12), (0, 255)):
        assert (label[raw == label_id] == cls).all(), label_id
    assert all((label[raw == v] != 255).all() for v in (7, 33))


def test_nthu_train_split_has_no_labels(tmp_path):
    written = write_nthu(tmp_path, city="Tokyo")
    with pytest.raises(DataError, match="this split has no labels.*with_labels: false"):
        build("nthu", tmp_path, "train", city="Tokyo")
    ds = build_dataset("nthu", root=str(tmp_path), split="train", options={"city": "Tokyo"}, num_classes=13,
                       ignore_index=255, with_labels=False)
    assert ds.ids == written.ids["train"] and ds.label(0) is None and ds[0]["image"].shape == (3, 24, 40)
    with pytest.raises(DataError, match="set options.city to one of: Rome, Rio, Tokyo, Taipei"):
        build("nthu", tmp_path, "test")
    with pytest.raises(DataError, match=f"nthu folder {tmp_path / 'Rome'} does not exist"):
        build("nthu", tmp_path, "test", city="Rome")


@pytest.mark.parametrize("legacy", [False, True])
def test_bdd100k_layouts(tmp_path, legacy):
    written = write_bdd100k(tmp_path, splits={"val": 3}, legacy=legacy)
    ds = build("bdd100k", tmp_path, "val")
    assert ds.layout == ("legacy" if legacy else "current") and ds.ids == written.ids["val"]
    for i, image_id in enumerate(ds.ids):
        np.testing.assert_array_equal(ds[i]["label"].numpy(), written.labels[image_id].astype(np.int64))
    merged = build_dataset("bdd100k", root=str(tmp_path), split="val", options={"label_space": "nthu"},
                           num_classes=13, ignore_index=255)
    expected = np.vectorize(lambda t: CITYSCAPES_TO_NTHU.get(int(t), 255))(written.labels[ds.ids[0]])
    np.testing.assert_array_equal(merged[0]["label"].numpy(), expected)


def test_bdd100k_unknown_layout(tmp_path):
    with pytest.raises(DataError, match=f"bdd100k folder {tmp_path / 'images' / '10k'}.*{tmp_path / 'seg' / 'images'}"):
        build("bdd100k", tmp_path, "val")


# ---------------------------------------------------------------------------------------------
# mIoU against the official Cityscapes evaluation


def test_miou_matches_official_cityscapes_evaluation(tmp_path, monkeypatch):
    """Predictions in label ids of the 19 evaluated classes (as a model's train ids convert to): the
    official script also counts predictions of ignored ids as misses, which a model never emits.
    ``train`` (label id 31) is absent from ground truth and predictions: both sides give NaN for it
    and leave it out of the average."""
    import cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling as ev

    write_cityscapes(tmp_path / "cs", splits={"val": 3}, foggy=False)
    rng = np.random.default_rng(1)
    eval_ids = np.array([i for i, t in CS_TRAIN_ID.items() if t != 255 and i != 31], dtype=np.uint8)
    gt_files = sorted((tmp_path / "cs/gtFine/val").glob("*/*_gtFine_labelIds.png"))
    pred_files = []
    for path in gt_files:
        gt = np.asarray(Image.open(path)).copy()
        gt[gt == 31] = 0
        Image.fromarray(gt).save(path)
        pred = np.where(np.isin(gt, eval_ids) & (rng.random(gt.shape) < 0.6), gt, rng.choice(eval_ids, gt.shape))
        pred_files.append(tmp_path / "pred" / path.name.replace("gtFine_labelIds", "pred"))
        pred_files[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(pred.astype(np.uint8)).save(pred_files[-1])
    for key, value in {"quiet": True, "evalInstLevelScore": False, "JSONOutput": False, "colorized": False}.items():
        monkeypatch.setattr(ev.args, key, value)
    result = ev.evaluateImgLists([str(p) for p in pred_files], [str(p) for p in gt_files], ev.args)

    ds = build("cityscapes", tmp_path / "cs", "val")
    cm, lut = ConfusionMatrix(19), cityscapes_lut()
    preds, gts = [], []
    for i, pred_file in enumerate(pred_files):
        preds.append(lut[np.asarray(Image.open(pred_file))].astype(np.int64))
        gts.append(ds.label(i))
        cm.update(torch.from_numpy(preds[-1]), torch.from_numpy(gts[-1]))
    official_iou = np.array([result["classScores"][name] for name in cityscapes_names()])
    np.testing.assert_allclose(cm.iou(), official_iou, rtol=0, atol=1e-6, equal_nan=True)
    assert np.isnan(official_iou[16]) and np.isfinite(np.delete(official_iou, 16)).all()
    mean, per_class = miou(np.stack(preds), np.stack(gts), 19)
    assert mean == pytest.approx(result["averageScoreClasses"], abs=1e-6)
    np.testing.assert_allclose(per_class, official_iou, atol=1e-6, equal_nan=True)
