"""``python -m selftrain``: the command line, as torchrun starts it (``torchrun -m selftrain run RECIPE``)."""

from selftrain.cli import main

if __name__ == "__main__":
    main(prog_name="selftrain")
