"""``selftrain priors build``: stream a source data set's labels into a spatial prior file."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .data import build_split
from .catalog import builtin_names, resolve_recipe
from .config import load_recipe, parse_override
from .data.datasets import build_dataset
from .errors import ConfigError, DataError, UserError
from .priors import build_spatial_prior, plot_prior, save_prior, scaled_kernel_size
from .progress import progress


def _source_dataset(dataset: str, root: str | None, split: str, options: Sequence[str],
                    num_classes: int | None, overrides: Sequence[str] = ()):
    """A recipe's data.source, or a registered data set named on the command line."""
    if dataset.endswith((".yaml", ".yml")) or dataset in builtin_names():
        cfg = load_recipe(resolve_recipe(dataset), list(overrides))
        ds = build_split(cfg.data.source, cfg, with_labels=True)
        return ds, cfg.data.num_classes, cfg.data.ignore_index, f"{dataset}: data.source ({cfg.data.source.name})"
    opts = dict(parse_override(o) for o in options)
    ds = build_dataset(dataset, root=root, split=split, options=opts, num_classes=num_classes or 0,
                       ignore_index=255)
    names = getattr(ds, "class_names", None)
    classes = num_classes or (len(names) if names else None)
    if classes is None:
        raise ConfigError(f"data set {dataset} does not name its classes; pass --num-classes")
    return ds, classes, 255, f"{dataset} root={root} split={split} {' '.join(options)}".strip()


def _labels(ds) -> Iterator[np.ndarray]:
    for i in progress(range(len(ds)), desc="priors: count", unit="img"):
        gt = ds.ground_truth(i) if hasattr(ds, "ground_truth") else ds[i]["label"].numpy()
        if gt is None:
            raise DataError(f"image {i} of the source set has no label; spatial priors need labelled source data")
        yield gt


def _parse_size(size: str | None) -> tuple[int, int] | None:
    if size is None:
        return None
    try:
        h, w = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size {size!r} must look like HxW, e.g. 64x128") from None
    if h < 1 or w < 1:
        raise ConfigError(f"--size {size!r} must be at least 1x1, e.g. 64x128")
    return h, w


def build_prior_command(*, dataset: str, root: str | None, split: str, options: Sequence[str],
                        num_classes: int | None, out: str, size: str | None, ksize: int | None,
                        plot: bool, command: str, overrides: Sequence[str] = ()) -> str:
    """Build, save (with its MANIFEST entry) and optionally plot a prior; returns a summary line."""
    if ksize is not None and ksize < 1:
        raise ConfigError(f"--ksize {ksize} must be a positive number of pixels, e.g. 35")
    if num_classes is not None and num_classes < 1:
        raise ConfigError(f"--num-classes {num_classes} must be at least 1")
    hw = _parse_size(size)
    ds, classes, ignore, source = _source_dataset(dataset, root, split, options, num_classes, overrides)
    height = hw[0] if hw else ds.ground_truth(0).shape[0] if hasattr(ds, "ground_truth") else ds[0]["label"].shape[0]
    k = ksize or scaled_kernel_size(height)
    prior = build_spatial_prior(_labels(ds), classes, k, size=hw, ignore_index=ignore)
    names = list(getattr(ds, "class_names", None) or [f"class_{i}" for i in range(classes)])
    entry = save_prior(out, prior, class_names=names, source=source, command=command, ksize=k)
    if plot:
        plot_prior(prior, names, Path(out).with_suffix(".png"))
    return f"wrote prior {out} shape {tuple(prior.shape)} ksize {k} sha256 {entry['sha256'][:12]}"


def show_prior(prior: str, *, out: str | None, class_names: Sequence[str] | None) -> Path:
    """Heat maps of a saved prior (``priors/NAME`` or ``priors/NAME.npz``); class names from MANIFEST.yaml."""
    from .priors import load_prior, manifest_entry

    path = Path(prior)
    if path.suffix != ".npz" and not path.is_file():
        path = path.with_suffix(".npz")
    array = load_prior(path)
    if class_names is None:
        listed = (manifest_entry(path) or {}).get("classes")
        if listed is not None and (not isinstance(listed, list) or len(listed) != array.shape[0]):
            count = len(listed) if isinstance(listed, list) else "no"
            raise UserError(f"{path.parent / 'MANIFEST.yaml'} lists {count} class names for {path}, which has "
                            f"{array.shape[0]} classes; rebuild the prior or pass --class-names")
        class_names = [str(n) for n in listed] if listed else [f"class_{i}" for i in range(array.shape[0])]
    if len(class_names) != array.shape[0]:
        raise UserError(f"--class-names gives {len(class_names)} names but {path} has {array.shape[0]} classes")
    return plot_prior(array, list(class_names), Path(out) if out else path.with_suffix(".png"))
