"""Package discovery (the metadata is in pyproject.toml).

Every package below ``selftrain/`` and ``adapters/`` is found, not listed: ``adapters/`` installs
as ``selftrain.adapters`` and ``recipes/`` as ``selftrain.recipes`` with its YAML files, so a wheel
holds the built-in recipes and ``selftrain run synth_cbst`` works from any folder.
"""

from setuptools import find_packages, setup

adapters = ["selftrain." + name for name in find_packages(include=["adapters", "adapters.*"])]
setup(
    packages=[*find_packages(include=["selftrain", "selftrain.*"]), *adapters, "selftrain.recipes"],
    package_dir={"selftrain.adapters": "adapters", "selftrain.recipes": "recipes"},
    package_data={"selftrain": ["py.typed"], "selftrain.recipes": ["**/*.yaml", "*.md"]},
)
