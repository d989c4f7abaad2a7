"""Command line: parse, call the library, print. Known user errors exit with code 2 and one line."""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

import click

from .errors import UserError


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("selftrain")
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False
    from .progress import set_quiet

    set_quiet(quiet)


def user_errors(fn):
    """Turn a UserError into ``error: <message>`` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except FloatingPointError as exc:  # the run diverged: not bad input, but no traceback either
            click.echo(f"error: {exc}; lower the learning rate or check the labels", err=True)
            sys.exit(1)

    return wrapper


@click.group()
@click.version_option(package_name="selftrain")
def main() -> None:
    """selftrain: self-training for unsupervised domain adaptation (ST, CBST, CBST-SP)."""


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key, e.g. rounds.count=2.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Run directory (default runs/<name>).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last complete round.")
@click.option("--quiet", is_flag=True, help="No progress bars or per-round tables.")
@user_errors
def run(recipe: str, overrides: tuple[str, ...], out: str | None, resume: bool, quiet: bool) -> None:
    """Run a recipe: round 0, then the self-training rounds."""
    from .build import build_engine
    from .config import load_recipe

    _setup_logging(quiet)
    cfg = load_recipe(recipe, overrides)
    out_dir = Path(out) if out else Path("runs") / cfg.name
    build_engine(cfg, out_dir).run(resume=resume)
    click.echo(f"run directory: {out_dir}")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
@user_errors
def evaluate(recipe: str, checkpoint: str, overrides: tuple[str, ...]) -> None:
    """Evaluate a checkpoint on the recipe's target val set."""
    from .build import build_adapter, build_data
    from .callbacks import format_eval
    from .checkpoint import load_checkpoint
    from .config import load_recipe
    from .training import evaluate as run_eval

    import torch

    cfg = load_recipe(recipe, overrides)
    data = build_data(cfg)
    if data.target_val is None:
        raise UserError("the recipe has no data.target_val; add a labelled target val set to evaluate")
    adapter = build_adapter(cfg)
    adapter.load_state_dict(load_checkpoint(checkpoint)["model"])
    result = run_eval(adapter.to(cfg.device), data.target_val, num_classes=cfg.data.num_classes,
                      ignore_index=cfg.data.ignore_index, batch_size=cfg.eval.batch_size,
                      device=torch.device(cfg.device))
    click.echo(format_eval(result, data.class_names))


@main.group()
def data() -> None:
    """Data sets: write the embedded synthetic benchmark."""


@data.command("synth")
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True)
@click.option("--num-source", default=600, show_default=True)
@click.option("--num-target-train", default=400, show_default=True)
@click.option("--num-target-val", default=200, show_default=True)
@click.option("--height", default=64, show_default=True)
@click.option("--width", default=128, show_default=True)
@user_errors
def data_synth(out: str, seed: int, num_source: int, num_target_train: int, num_target_val: int,
               height: int, width: int) -> None:
    """Write the synthetic street-scene benchmark (source, target_train, target_val) as PNGs."""
    from .data.synth import write_benchmark

    path = write_benchmark(out, seed=seed, num_source=num_source, num_target_train=num_target_train,
                           num_target_val=num_target_val, height=height, width=width)
    click.echo(f"wrote {num_source + num_target_train + num_target_val} images to {path}")


@main.group()
def priors() -> None:
    """Spatial priors for CBST-SP."""


@priors.command("build")
@click.option("--dataset", required=True, help="A recipe (its data.source is used) or a data set name.")
@click.option("--root", default=None, help="Data set root (with a data set name).")
@click.option("--split", default="", help="Data set split (with a data set name).")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE", help="Data set option (with a name).")
@click.option("--num-classes", type=int, default=None, help="Classes (with a data set name).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="priors/<name>.npz")
@click.option("--size", default=None, metavar="HxW", help="Prior resolution (default: the labels' size).")
@click.option("--ksize", type=int, default=None, help="Gaussian kernel size in pixels (default: 70 scaled to the height).")
@click.option("--plot", is_flag=True, help="Also write <out>.png with one heat map per class.")
@user_errors
def priors_build(dataset, root, split, options, num_classes, out, size, ksize, plot) -> None:
    """Count per-pixel class frequencies over a source set, smooth, normalise (CBST §4.4)."""
    from .priorbuild import build_prior_command

    command = " ".join(["selftrain", *sys.argv[1:]])
    summary = build_prior_command(dataset=dataset, root=root, split=split, options=options,
                                  num_classes=num_classes, out=out, size=size, ksize=ksize, plot=plot,
                                  command=command)
    click.echo(summary)


@main.command("list")
@click.argument("what", type=click.Choice(["adapters", "policies", "datasets"]))
def list_cmd(what: str) -> None:
    """List the registered adapters, policies or data sets."""
    if what == "adapters":
        from selftrain.adapters import ADAPTERS as reg
    elif what == "policies":
        from .policies import POLICIES as reg
    else:
        from .data.datasets import DATASETS as reg
    for name in reg.names():
        click.echo(name)


@main.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds, e.g. 0,1,2.")
@click.option("--recipes", "recipes_dir", default="recipes", show_default=True, type=click.Path(file_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Applied to every recipe.")
@click.option("--resume", is_flag=True, help="Continue an interrupted demo.")
@click.option("--quiet", is_flag=True)
@user_errors
def demo(out: str, seeds: str, recipes_dir: str, overrides: tuple[str, ...], resume: bool, quiet: bool) -> None:
    """Source only, ST, CBST and CBST-SP on the embedded synthetic benchmark, then a comparison."""
    from .demo import run_demo

    _setup_logging(quiet)
    seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    click.echo(run_demo(out=Path(out), seeds=seed_list, recipes_dir=Path(recipes_dir),
                        overrides=list(overrides), resume=resume))


if __name__ == "__main__":
    main()
