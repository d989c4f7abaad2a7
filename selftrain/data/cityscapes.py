"""Data sets labelled in the Cityscapes class space, and the tables that merge that space.

``cityscapes`` and ``foggy_cityscapes`` (Cordts et al., CVPR 2016; Sakaridis et al., IJCV 2018),
``nthu`` cross-city (Chen et al., ICCV 2017) and ``bdd100k`` (Yu et al., CVPR 2020). Label files
hold Cityscapes label ids (0..33, mapped by the official ``cityscapesscripts`` table) or the 19
train ids (BDD100K). ``label_space`` re-maps the 19 classes to the 16 of SYNTHIA or the 13 of
NTHU, so that a Cityscapes-style target can meet a SYNTHIA source (``data.num_classes: 16``) and a
Cityscapes source can meet an NTHU target (``data.num_classes: 13``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import DataError
from .registry import DATASETS
from .segsets import (SYNTHIA_16_NAMES, Pair, PairedDataset, cityscapes_lut, cityscapes_names, list_images,
                      need_dir, need_root, need_split, table_lut)

log = logging.getLogger(__name__)

# NTHU cross-city (Chen et al., ICCV 2017; CBST Table 4): the 13 annotated classes.
NTHU_13_NAMES = ("road", "sidewalk", "building", "traffic light", "traffic sign", "vegetation", "sky",
                 "person", "rider", "car", "bus", "motorcycle", "bicycle")
# Cityscapes train id (19) -> NTHU class (13); 255: no NTHU counterpart.
CITYSCAPES_TO_NTHU = {0: 0, 1: 1, 2: 2, 3: 255, 4: 255, 5: 255, 6: 3, 7: 4, 8: 5, 9: 255, 10: 6, 11: 7, 12: 8,
                      13: 9, 14: 255, 15: 10, 16: 255, 17: 11, 18: 12}
# Cityscapes train id (19) -> SYNTHIA class (16); terrain, truck and train have no counterpart.
CITYSCAPES_TO_SYNTHIA = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 7: 7, 8: 8, 9: 255, 10: 9, 11: 10, 12: 11,
                         13: 12, 14: 255, 15: 13, 16: 255, 17: 14, 18: 15}
LABEL_SPACES = {"cityscapes": None, "synthia": CITYSCAPES_TO_SYNTHIA, "nthu": CITYSCAPES_TO_NTHU}
SPLITS = ("train", "val", "test")
FOG_BETAS = {0.005: "0.005", 0.01: "0.01", 0.02: "0.02"}


# gtFine *_labelIds.png files hold the label ids 0..33 of cityscapesscripts' table.
CITYSCAPES_LABEL_IDS = 34


def space_table(space: str, *, label_ids: bool) -> tuple[np.ndarray | None, tuple[str, ...]]:
    """Lookup table uint8 [256] and class names for Cityscapes-style labels in ``space``.

    ``label_ids``: the files hold Cityscapes label ids (0..33); otherwise they hold the 19 train
    ids, kept as they are in the ``cityscapes`` space (the table is then None).
    """
    if space not in LABEL_SPACES:
        raise DataError(f"label_space {space!r} is unknown; choose one of: {', '.join(LABEL_SPACES)}")
    names = {"cityscapes": cityscapes_names(), "synthia": SYNTHIA_16_NAMES, "nthu": NTHU_13_NAMES}[space]
    table = LABEL_SPACES[space]
    if table is None:
        return (cityscapes_lut() if label_ids else None), names
    merge = table_lut(table)
    return (merge[cityscapes_lut()] if label_ids else merge), names


def cityscapes_pairs(image_dir: Path, image_tag: str, gt_dir: Path) -> list[Pair]:
    """``image_dir/<city>/<stem><image_tag>`` with ``gt_dir/<city>/<stem>_gtFine_labelIds.png``.

    Ids are ``<city>/<stem>``, the same for a clear and a foggy image of one scene.
    """
    pairs = []
    for path in list_images(image_dir, f"*/*{image_tag}"):
        stem, city = path.name[: -len(image_tag)], path.parent.name
        pairs.append(Pair(f"{city}/{stem}", path, gt_dir / city / f"{stem}_gtFine_labelIds.png"))
    return pairs


def gt_folder(base: Path, split: str, with_labels: bool) -> Path:
    path = base / "gtFine" / split
    return need_dir(path, "cityscapes gtFine") if with_labels else path


@DATASETS.register("cityscapes")
class Cityscapes(PairedDataset):
    """Cityscapes: ``root/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`` with
    ``root/gtFine/<split>/<city>/<stem>_gtFine_labelIds.png``; ids are ``<city>/<stem>``.

    Label ids map to the 19 train ids by the official table (255 ignore); ``label_space``
    ``synthia`` or ``nthu`` merges them further to 16 or 13 classes.
    """

    def __init__(self, *, root: str | None, split: str, label_space: str = "cityscapes",
                 list_file: str | None = None, with_labels: bool = True, num_classes: int | None = None,
                 ignore_index: int = 255) -> None:
        base = need_root(root, "cityscapes")
        need_split(split, SPLITS, "cityscapes")
        image_dir = need_dir(base / "leftImg8bit" / split, "cityscapes")
        pairs = cityscapes_pairs(image_dir, "_leftImg8bit.png", gt_folder(base, split, with_labels))
        lut, names = space_table(label_space, label_ids=True)
        super().__init__(pairs=pairs, where=f"cityscapes {split} ({image_dir})", lut=lut, class_names=names,
                         list_file=list_file, with_labels=with_labels, num_classes=num_classes,
                         ignore_index=ignore_index, raw_values=CITYSCAPES_LABEL_IDS)


@DATASETS.register("foggy_cityscapes")
class FoggyCityscapes(PairedDataset):
    """Foggy Cityscapes: ``root/leftImg8bit_foggy/<split>/<city>/<stem>_leftImg8bit_foggy_beta_<beta>.png``.

    ``beta`` (fog density) is one of 0.005, 0.01, 0.02 (the densest, default). Labels come from
    ``root/gtFine`` exactly as for ``cityscapes``, and ids are the clear image's ``<city>/<stem>``
    so that results on both compare image by image. For the refined subset of the release, pass
    its file list as ``list_file``.
    """

    def __init__(self, *, root: str | None, split: str, beta: float = 0.02, label_space: str = "cityscapes",
                 list_file: str | None = None, with_labels: bool = True, num_classes: int | None = None,
                 ignore_index: int = 255) -> None:
        base = need_root(root, "foggy_cityscapes")
        need_split(split, SPLITS, "foggy_cityscapes")
        tag = FOG_BETAS.get(float(beta)) if isinstance(beta, (int, float)) else None
        if tag is None:
            raise DataError(f"foggy_cityscapes beta {beta!r} is unknown; set options.beta to one of: "
                            f"{', '.join(FOG_BETAS.values())}")
        image_dir = need_dir(base / "leftImg8bit_foggy" / split, "foggy_cityscapes")
        pairs = cityscapes_pairs(image_dir, f"_leftImg8bit_foggy_beta_{tag}.png", gt_folder(base, split, with_labels))
        lut, names = space_table(label_space, label_ids=True)
        self.beta = float(beta)
        super().__init__(pairs=pairs, where=f"foggy_cityscapes {split} beta {tag} ({image_dir})", lut=lut,
                         class_names=names, list_file=list_file, with_labels=with_labels, num_classes=num_classes,
                         ignore_index=ignore_index, raw_values=CITYSCAPES_LABEL_IDS)


@DATASETS.register("nthu")
class NTHU(PairedDataset):
    """NTHU cross-city (Chen et al., ICCV 2017): ``root/<City>/Images/{Train,Test}/*`` for one city.

    Only Test is labelled: ``root/<City>/Labels/Test/<stem>_eval.png``. Those files hold Cityscapes
    label ids of the 13 annotated classes (7 road, 8 sidewalk, 11 building, 19 light, 20 sign,
    21 vegetation, 23 sky, 24 person, 25 rider, 26 car, 28 bus, 32 motorcycle, 33 bicycle), mapped
    by the official Cityscapes table and ``CITYSCAPES_TO_NTHU`` to the 13 classes, others 255.
    """

    CITIES = ("Rome", "Rio", "Tokyo", "Taipei")

    def __init__(self, *, root: str | None, city: str | None = None, split: str = "test",
                 list_file: str | None = None, with_labels: bool = True, num_classes: int | None = None,
                 ignore_index: int = 255) -> None:
        base = need_root(root, "nthu")
        names = {c.lower(): c for c in self.CITIES}
        if city is None or str(city).lower() not in names:
            raise DataError(f"nthu option city is {city!r}; set options.city to one of: {', '.join(self.CITIES)}")
        folder = need_split(split.lower(), ("train", "test"), "nthu").capitalize()
        city_dir = need_dir(base / names[str(city).lower()], "nthu")
        image_dir = need_dir(city_dir / "Images" / folder, "nthu")
        label_dir = city_dir / "Labels" / folder
        pairs = [Pair(p.stem, p, label_dir / f"{p.stem}_eval.png" if folder == "Test" else None)
                 for p in list_images(image_dir, "*")]
        lut, class_names = space_table("nthu", label_ids=True)
        super().__init__(pairs=pairs, where=f"nthu {names[str(city).lower()]} {folder} ({image_dir})", lut=lut,
                         class_names=class_names, list_file=list_file, with_labels=with_labels,
                         num_classes=num_classes, ignore_index=ignore_index)


BDD_LAYOUTS = {
    # name: (image folder, label folder, label file suffix), relative to root, {split} filled in
    "current": ("images/10k/{split}", "labels/sem_seg/masks/{split}", ".png"),
    "legacy": ("seg/images/{split}", "seg/labels/{split}", "_train_id.png"),
}


def bdd_layout(base: Path) -> str:
    """Which BDD100K release layout ``base`` holds: ``current`` (images/10k) or ``legacy`` (seg/)."""
    for name, (images, _, _) in BDD_LAYOUTS.items():
        if (base / images.split("/{split}")[0]).is_dir():
            log.info("bdd100k: %s layout detected in %s", name, base)
            return name
    raise DataError(f"bdd100k folder {base / 'images' / '10k'} (or the older {base / 'seg' / 'images'}) does not "
                    "exist; point root at the bdd100k folder of the release")


@DATASETS.register("bdd100k")
class BDD100K(PairedDataset):
    """BDD100K semantic segmentation (Yu et al., CVPR 2020), 10K images, labels in the 19 Cityscapes train ids.

    Two release layouts are detected (``self.layout``): ``current``, ``images/10k/<split>/*.jpg``
    with ``labels/sem_seg/masks/<split>/<stem>.png``, and ``legacy``, ``seg/images/<split>/*.jpg``
    with ``seg/labels/<split>/<stem>_train_id.png``. ``label_space`` maps the 19 classes to
    ``synthia`` (16) or ``nthu`` (13).
    """

    def __init__(self, *, root: str | None, split: str, label_space: str = "cityscapes",
                 list_file: str | None = None, with_labels: bool = True, num_classes: int | None = None,
                 ignore_index: int = 255) -> None:
        base = need_root(root, "bdd100k")
        need_split(split, ("train", "val", "test"), "bdd100k")
        self.layout = bdd_layout(base)
        images, labels, suffix = (s.format(split=split) for s in BDD_LAYOUTS[self.layout])
        image_dir = need_dir(base / images, "bdd100k")
        label_dir = need_dir(base / labels, "bdd100k") if with_labels else base / labels
        pairs = [Pair(p.stem, p, label_dir / (p.stem + suffix)) for p in list_images(image_dir, "*")]
        lut, class_names = space_table(label_space, label_ids=False)
        super().__init__(pairs=pairs, where=f"bdd100k {split} ({image_dir})", lut=lut, class_names=class_names,
                         list_file=list_file, with_labels=with_labels, num_classes=num_classes,
                         ignore_index=ignore_index)
