"""The wheel a user installs holds every module of the source tree and every built-in recipe."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory) -> set[str]:
    """The wheel built from a copy of the tracked sources (a checkout's own build/ folder may hold
    modules that no longer exist)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in ("selftrain", "adapters", "recipes"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(src)],
                   check=True, cwd=out)
    (wheel,) = out.glob("selftrain-*.whl")
    return set(zipfile.ZipFile(wheel).namelist())


def _tree(folder: str, installed_as: str, pattern: str) -> set[str]:
    root = REPO / folder
    return {f"{installed_as}/{p.relative_to(root).as_posix()}" for p in root.rglob(pattern)
            if "__pycache__" not in p.parts}


def test_every_module_of_the_tree_is_in_the_wheel(wheel_files):
    tree = _tree("selftrain", "selftrain", "*.py") | _tree("adapters", "selftrain/adapters", "*.py")
    assert len(tree) > 40 and tree <= wheel_files, f"missing from the wheel: {sorted(tree - wheel_files)}"


def test_every_recipe_ships_in_the_wheel(wheel_files):
    recipes = _tree("recipes", "selftrain/recipes", "*.yaml")
    assert len(recipes) > 50 and recipes <= wheel_files, f"missing: {sorted(recipes - wheel_files)}"
    assert "selftrain/recipes/README.md" in wheel_files
