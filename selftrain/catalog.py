"""The built-in recipes: found by name, listed, copied out for editing.

They ship inside the package as ``selftrain.recipes`` (the checkout's ``recipes/`` folder), so an
installed selftrain runs its own recipes from any folder: ``selftrain run synth_cbst``. A recipe's
name is its path below that folder without ``.yaml`` (``synth_cbst``, ``gta2city/cbst_deeplabv2``).
A path that exists as a file always wins over a built-in name.
"""

from __future__ import annotations

import difflib
import importlib.resources
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import load_recipe, read_chain
from .errors import ConfigError, UserError
from .io import write_text_atomic


def builtin_root() -> Path:
    """The folder of the built-in recipes (in the checkout or in the installed package)."""
    return Path(str(importlib.resources.files("selftrain.recipes")))


def builtin_names() -> list[str]:
    root = builtin_root()
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def resolve_recipe(arg: str | Path) -> Path:
    """``arg`` as a recipe file: an existing path, else a built-in name (``.yaml`` optional)."""
    path = Path(arg)
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"recipe {arg} is a folder; pass a YAML file or a built-in name (selftrain recipes list)")
    return builtin_path(str(arg), f"no recipe file {arg} and no built-in recipe of that name")


def builtin_path(name: str, problem: str = "") -> Path:
    """The file of built-in recipe ``name`` (``.yaml`` optional); unknown: one line with close names."""
    name = name.removesuffix(".yaml")
    names = builtin_names()
    if name in names:
        return builtin_root() / f"{name}.yaml"
    by_stem = {}
    for n in names:
        by_stem.setdefault(Path(n).name, n)
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6) or [
        by_stem[m] for m in difflib.get_close_matches(Path(name).name, list(by_stem), n=3, cutoff=0.6)]
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ConfigError(f"{problem or f'no built-in recipe {name}'}{hint}; `selftrain recipes list` shows them")


@dataclass(frozen=True)
class RecipeInfo:
    name: str
    task: str
    policy: str
    rounds: int
    about: str  # the first sentence of the recipe's comment header: what it runs or reproduces


def describe() -> list[RecipeInfo]:
    """Every built-in recipe with its task, policy, number of rounds and what it is about."""
    out = []
    for name in builtin_names():
        path = builtin_root() / f"{name}.yaml"
        cfg = load_recipe(path)
        out.append(RecipeInfo(name=name, task=cfg.task, policy=cfg.policy.name, rounds=cfg.rounds.count,
                              about=_first_comment(path)))
    return out


def _first_comment(path: Path) -> str:
    """The first sentence of the recipe's comment header."""
    text = " ".join(line.lstrip("#").strip() for line in _header(path))
    end = re.search(r"(?<!\bal)(?<!\bSec)(?<!\bFig)(?<!\be\.g)\.\s+(?=[A-Z])", text)  # not "et al. X"
    return text if end is None else text[:end.start() + 1]


def copy_recipe(name: str, dest: str | Path, *, force: bool = False) -> Path:
    """Write built-in recipe ``name`` to ``dest`` (a file, or a folder to put ``<name>.yaml`` in) as
    one self-contained file: its ``extends:`` chain merged in, its comment header kept. Relative
    paths inside recipes (data roots, weights, priors) are relative to where selftrain runs, so
    they mean the same in the copy."""
    source = builtin_path(name)
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / source.name
    if dest.suffix not in (".yaml", ".yml"):
        raise UserError(f"{dest} is not a .yaml file name; pass PATH ending in .yaml or an existing folder")
    if dest.exists() and not force:
        raise UserError(f"{dest} exists; pass --force to overwrite it or choose another PATH")
    if not dest.parent.is_dir():
        raise UserError(f"folder {dest.parent} does not exist; create it first")
    header = _header(source)
    chain = _chain(source)
    if len(chain) > 1:
        header.append(f"# Copied from the built-in recipe {chain[0]} with its extends chain merged in:")
        header += textwrap.wrap(" -> ".join(chain), width=98, initial_indent="#   ", subsequent_indent="#   ",
                                break_on_hyphens=False)
    body = yaml.safe_dump(read_chain(source), sort_keys=False, default_flow_style=None, width=100)
    write_text_atomic(dest, "\n".join(header) + ("\n" if header else "") + body)
    return dest


def _header(path: Path) -> list[str]:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines


def _chain(path: Path) -> list[str]:
    root, out = builtin_root().resolve(), []
    while True:
        out.append(path.resolve().relative_to(root).with_suffix("").as_posix())
        parent = (yaml.safe_load(path.read_text()) or {}).get("extends")
        if not parent:
            return out
        path = path.parent / str(parent)
