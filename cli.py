"""Run the command line from a checkout: ``python cli.py run recipes/synth_cbst.yaml``."""

from selftrain.cli import main

if __name__ == "__main__":
    main()
