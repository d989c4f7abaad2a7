"""Run the command line from a checkout: ``python cli.py run recipes/synth_cbst.yaml``.

The installed console script is ``selftrain``. Without an install, ``adapters/`` is not yet mapped
to ``selftrain.adapters`` (pyproject's package-dir does that), so this shim maps it here.
"""

import importlib.util
from pathlib import Path

import selftrain

if importlib.util.find_spec("selftrain.adapters") is None:
    selftrain.__path__.append(str(Path(__file__).resolve().parent))  # finds ./adapters as selftrain.adapters

from selftrain.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
