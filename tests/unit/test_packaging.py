"""The wheel a user installs holds every package of the source tree."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_package_of_the_tree_is_listed_for_the_wheel():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    mapping = {Path(folder): name for name, folder in setuptools["package-dir"].items()}
    found = {".".join([name, *init.parent.relative_to(REPO / root).parts])
             for root, name in mapping.items() for init in (REPO / root).rglob("__init__.py")}
    assert found and found == listed, f"missing from pyproject packages: {sorted(found - listed)}"
