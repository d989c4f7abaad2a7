"""Command line: parse, call the library, print.

The error contract, the same for every command: a ``UserError`` or a bad option is one line
``error: <problem>; <fix>`` on stderr and exit code 2; so is an ``OSError`` (a missing path, a
read-only folder, a full disk), naming the path and the system's message; a diverged run is one
line and exit code 1; anything else is an internal error, one line with its type and message and
exit code 1; Ctrl-C is one line saying how to continue, exit code 130. ``--debug`` (or
``SELFTRAIN_DEBUG=1``) adds the full traceback to any of them.

Under torchrun (``torchrun --nproc_per_node N -m selftrain run RECIPE``) ``run`` and ``evaluate``
join the process group, rank 0 alone prints, and an error reads ``error: rank R: <problem>`` with
the same exit codes. An error every rank raised from a decision taken together (a non-finite loss,
a run folder rank 0 refused) is printed once, by rank 0; a rank whose peer vanished (killed, or
stopped by its own error) says so in one line, and torchrun stops the remaining processes.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import re
import shlex
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import click

from . import dist
from .errors import UserError

EXIT_USER, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130
_MESSAGE_CHARS = 600  # an internal error's message beyond this is cut; --debug shows it whole
_OS_FIXES = {
    errno.ENOENT: "check the path",
    errno.EACCES: "choose a path you may write to, or change its permissions",
    errno.EPERM: "choose a path you may write to, or change its permissions",
    errno.EROFS: "the file system is read-only; choose another path",
    errno.ENOSPC: "free some disk space or choose a path on another disk",
    errno.EDQUOT: "free some disk space or choose a path on another disk",
    errno.ENOTDIR: "a file stands where a folder is needed; choose another path",
    errno.EISDIR: "a folder stands where a file is needed; choose another path",
    errno.EEXIST: "something already stands there; choose another path",
}


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("selftrain")
    root.handlers[:] = [handler]
    root.setLevel(logging.ERROR if not dist.launched_main() else logging.WARNING if quiet else logging.INFO)
    root.propagate = False
    from .progress import set_quiet

    set_quiet(quiet)


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _debug() -> bool:
    """Whether ``--debug`` (or ``SELFTRAIN_DEBUG=1``) was given to ``selftrain``."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.find_root().params.get("debug"))


def os_error_message(exc: OSError) -> str:
    """An OSError as ``<path>: <system message>; <fix>`` (the paths and the fix when it has them)."""
    paths = [str(f) for f in (exc.filename, exc.filename2) if f is not None]
    what = exc.strerror or _one_line(str(exc)) or type(exc).__name__
    fix = _OS_FIXES.get(exc.errno or 0, "check the path and the disk")
    return f"{' -> '.join(paths)}: {what}; {fix}" if paths else f"{what}; {fix}"


def internal_error_message(exc: BaseException) -> str:
    text = _one_line(str(exc))
    if len(text) > _MESSAGE_CHARS:
        text = text[:_MESSAGE_CHARS] + " ..."
    return (f"internal error: {type(exc).__name__}: {text}; this is a bug in selftrain: rerun with --debug "
            f"and report it with the output of --debug")


def command_words(ctx: click.Context) -> list[str]:
    """``["selftrain", "labels", "show"]``: the command as a user types it, whatever the program name."""
    words = []
    while ctx.parent is not None:
        words.append(ctx.info_name or "")
        ctx = ctx.parent
    return ["selftrain", *reversed(words)]


def resume_command(ctx: click.Context) -> str:
    """The command line that continues an interrupted command: the same arguments plus ``--resume``."""
    words = command_words(ctx)
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if isinstance(param, click.Argument):
            words += [str(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        elif param.name == "resume" or value is None or value == () or value is False:
            continue
        elif isinstance(param, click.Option) and param.is_flag:
            words.append(param.opts[0])
        elif isinstance(param, click.Option) and value != param.default:
            for v in value if param.multiple else [value]:
                words += [param.opts[0], str(v)]
    return shlex.join([*words, "--resume"])


def _interrupted_message() -> str:
    ctx = click.get_current_context(silent=True)
    if ctx is None or not any(p.name == "resume" for p in ctx.command.params):
        return "interrupted; nothing was finished, run the command again"
    return f"interrupted; continue with `{resume_command(ctx)}` (the same --out and --set, plus --resume)"


def _fail(message: str, code: int, exc: BaseException | None = None) -> None:
    together = dist.launched() and exc is not None and dist.raised_everywhere(exc)
    if together and dist.launched_rank() != 0:
        _meet()  # rank 0 prints the same line before any rank exits (torchrun then stops the rest)
        sys.exit(code)
    if dist.launched():
        message = f"rank {dist.launched_rank()}: {message}"
    if _debug():
        traceback.print_exc()
    click.echo(f"error: {message}", err=True)
    if together:
        _meet()
    sys.exit(code)


def _meet() -> None:
    """A last barrier of ranks that stop together; a peer already gone ends it at once."""
    try:
        dist.barrier()
    except RuntimeError:
        pass


def _peer_message(exc: BaseException) -> str:
    """The first sentence of a backend's error, without its source location (``[.../pair.cc:561]``)."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", _one_line(str(exc)))
    return text.split(". ")[0][:200]


def _peer_lost(exc: BaseException) -> bool:
    """A collective failed because another process of the run went away (torchrun only)."""
    return dist.launched() and dist.is_peer_error(exc)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The error contract (module docstring) around a command."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            _fail(_interrupted_message(), EXIT_INTERRUPTED)
        except UserError as exc:
            _fail(_one_line(str(exc)), EXIT_USER, exc)
        except FloatingPointError as exc:  # the run diverged: not bad input, but no traceback either
            _fail(f"{_one_line(str(exc))}; lower the learning rate or check the labels", EXIT_FAILED, exc)
        except OSError as exc:
            if exc.errno == errno.EPIPE:  # stdout closed early (`| head`): click quiets it
                raise
            _fail(os_error_message(exc), EXIT_USER)
        except Exception as exc:
            if _peer_lost(exc):
                _fail(f"another process of this run stopped ({_peer_message(exc)}); its own error line, "
                      "or torchrun's report, names the cause", EXIT_FAILED)
            _fail(internal_error_message(exc), EXIT_FAILED)

    wrapper.error_contract = True  # type: ignore[attr-defined]
    return wrapper


class _UsageLine(click.UsageError):
    """A bad option or argument as one line, with where to read the command's options."""

    def show(self, file: Any = None) -> None:
        where = " ".join(command_words(self.ctx)) if self.ctx is not None else "selftrain"
        click.echo(f"error: {_one_line(self.message).rstrip('.')}; see `{where} --help`", err=True)


@contextlib.contextmanager
def _usage_lines() -> Iterator[None]:
    try:
        yield
    except click.exceptions.NoArgsIsHelpError:
        raise
    except click.UsageError as exc:
        if isinstance(exc, _UsageLine):
            raise
        raise _UsageLine(exc.format_message(), exc.ctx) from None


class _Main(click.Group):
    """The ``selftrain`` group: option and argument errors of every command as one line."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        with _usage_lines():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        with _usage_lines():
            return super().invoke(ctx)


@click.group(cls=_Main)
@click.version_option(package_name="selftrain")
@click.option("--debug", is_flag=True, envvar="SELFTRAIN_DEBUG",
              help="Show the full traceback of any error (also SELFTRAIN_DEBUG=1).")
def main(debug: bool) -> None:
    """selftrain: self-training for unsupervised domain adaptation (ST, CBST, CBST-SP)."""


@main.command()
@click.argument("recipe")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key, e.g. rounds.count=2.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Run directory (default runs/<name>).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last complete round.")
@click.option("--quiet", is_flag=True, help="No progress bars or per-round tables.")
@user_errors
def run(recipe: str, overrides: tuple[str, ...], out: str | None, resume: bool, quiet: bool) -> None:
    """Run a recipe (a YAML file or a built-in name, see `selftrain recipes list`): round 0, then
    the self-training rounds."""
    from .build import build_engine
    from .catalog import resolve_recipe
    from .config import load_recipe

    _setup_logging(quiet or not dist.launched_main())  # under torchrun rank 0 alone prints
    cfg = load_recipe(resolve_recipe(recipe), overrides)
    _join_group(cfg.device)
    out_dir = Path(out) if out else Path("runs") / cfg.name
    build_engine(cfg, out_dir).run(resume=resume)
    if dist.is_main():
        click.echo(f"run directory: {out_dir}")


def _join_group(device: str) -> None:
    """Under torchrun, join the process group (gloo on the CPU, NCCL on CUDA); else nothing."""
    from .build import resolve_device

    dist.init_from_env(dist.local_device(resolve_device(device)))


@main.command()
@click.argument("recipe")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
@user_errors
def evaluate(recipe: str, checkpoint: str, overrides: tuple[str, ...]) -> None:
    """Evaluate a checkpoint on the recipe's target val set."""
    from .build import build_adapter, build_data, resolve_device
    from .callbacks import format_eval
    from .catalog import resolve_recipe
    from .checkpoint import load_weights
    from .config import load_recipe, to_yaml
    from .tasks import build_task
    from .training import Precision

    cfg = load_recipe(resolve_recipe(recipe), overrides)
    data = build_data(cfg)
    if data.target_val is None:
        raise UserError("the recipe has no data.target_val; add a labelled target val set to evaluate")
    adapter = build_adapter(cfg)
    load_weights(adapter, checkpoint, recipe_yaml=to_yaml(cfg))  # refused before any tensor is loaded if it does not fit
    _join_group(cfg.device)
    device = dist.local_device(resolve_device(cfg.device))
    task = build_task(cfg.task, data, use_07=cfg.eval.use_07)
    with Precision(cfg.precision, device).autocast():
        result = task.evaluate(adapter.to(device), data.target_val, device=device, desc="evaluate")
    if dist.is_main():
        click.echo(format_eval(result, data.class_names))


@main.group()
def data() -> None:
    """Data sets: check a recipe's data, write the embedded synthetic benchmark."""


@data.command("synth")
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True)
@click.option("--num-source", default=600, show_default=True)
@click.option("--num-target-train", default=400, show_default=True)
@click.option("--num-target-val", default=200, show_default=True)
@click.option("--height", default=None, type=int, help="Image height (default 64; 128 for detection).")
@click.option("--width", default=None, type=int, help="Image width (default 128).")
@click.option("--task", type=click.Choice(["segmentation", "detection"]), default="segmentation", show_default=True,
              help="detection writes the shapes benchmark in VOC layout (read it with the voc data set).")
@user_errors
def data_synth(out: str, seed: int, num_source: int, num_target_train: int, num_target_val: int,
               height: int | None, width: int | None, task: str) -> None:
    """Write a synthetic benchmark (source, target_train, target_val) to disk."""
    if task == "detection":
        from .data.synth_det import write_det_benchmark as write
    else:
        from .data.synth import write_benchmark as write

    default_height = 128 if task == "detection" else 64
    try:
        path = write(out, seed=seed, num_source=num_source, num_target_train=num_target_train,
                     num_target_val=num_target_val, height=default_height if height is None else height,
                     width=128 if width is None else width)
    except ValueError as exc:
        raise UserError(f"{exc}; fix the option") from None
    click.echo(f"wrote {num_source + num_target_train + num_target_val} images to {path}")


@data.command("check")
@click.argument("recipe")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key, e.g. data.source.root=/data/gta5.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Count class frequencies over the first N images of each split only.")
@user_errors
def data_check(recipe: str, overrides: tuple[str, ...], limit: int | None) -> None:
    """Build the recipe's data sets, check every image has its label, print class frequencies."""
    from .catalog import resolve_recipe
    from .config import load_recipe
    from .data.check import check_data, format_report

    _setup_logging(quiet=False)
    click.echo(format_report(check_data(load_recipe(resolve_recipe(recipe), overrides), limit=limit)))


@main.group()
def recipes() -> None:
    """The built-in recipes: list them, copy one to edit."""


@recipes.command("list")
@user_errors
def recipes_list() -> None:
    """Name, task, policy, rounds and what each built-in recipe runs or reproduces."""
    from .catalog import describe

    rows = describe()
    width = max(len(r.name) for r in rows)
    click.echo(f"{'name':<{width}}  {'task':<12}  {'policy':<12}  rounds  about")
    for r in rows:
        policy = r.policy if r.rounds else "(source)"
        click.echo(f"{r.name:<{width}}  {r.task:<12}  {policy:<12}  {r.rounds:>6}  {r.about}")
    click.echo("\nrun one with `selftrain run NAME`, copy one to edit with `selftrain recipes cp NAME PATH`")


@recipes.command("cp")
@click.argument("name")
@click.argument("path", type=click.Path())
@click.option("--force", is_flag=True, help="Overwrite PATH if it exists.")
@user_errors
def recipes_cp(name: str, path: str, force: bool) -> None:
    """Copy built-in recipe NAME to PATH (a .yaml file or a folder), its extends chain merged in."""
    from .catalog import copy_recipe

    click.echo(f"wrote {copy_recipe(name, path, force=force)}")


@main.group()
def priors() -> None:
    """Spatial priors for CBST-SP."""


@priors.command("build")
@click.option("--dataset", required=True, help="A recipe file or built-in recipe name (its data.source is used), or a data set name.")
@click.option("--root", default=None, help="Data set root (with a data set name).")
@click.option("--split", default="", help="Data set split (with a data set name).")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE", help="Data set option (with a name).")
@click.option("--num-classes", type=click.IntRange(min=1), default=None, help="Classes (with a data set name).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="priors/<name>.npz")
@click.option("--size", default=None, metavar="HxW", help="Prior resolution (default: the labels' size).")
@click.option("--ksize", type=click.IntRange(min=1), default=None, help="Gaussian kernel size in pixels (default: 70 scaled to the height).")
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


@priors.command("show")
@click.argument("prior", type=click.Path(dir_okay=False))
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="PNG to write (default: PRIOR with .png).")
@click.option("--class-names", default=None, help="Comma-separated names (default: the prior's MANIFEST entry or class_i).")
@user_errors
def priors_show(prior: str, out: str | None, class_names: str | None) -> None:
    """Heat maps of a spatial prior, one per class."""
    from .priorbuild import show_prior

    click.echo(f"wrote {show_prior(prior, out=out, class_names=class_names.split(',') if class_names else None)}")


@main.group()
def labels() -> None:
    """Inspect the pseudo-labels of a run, round by round."""


@labels.command("summary")
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--recount", is_flag=True, help="Count labels by reading every image instead of the stored totals.")
@user_errors
def labels_summary(run: str, as_json: bool, recount: bool) -> None:
    """Per round: portion, labelled pixels or boxes, class shares, thresholds, precision, score."""
    from .inspect import format_summary, run_class_names, summarize_run, summary_json

    rows = summarize_run(run, recount=recount)
    names = run_class_names(run)
    click.echo(summary_json(rows, names) if as_json else format_summary(rows, names))


@labels.command("show")
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--round", "round_index", required=True, type=click.IntRange(min=0))
@click.option("--image", "image_id", default=None, help="Image id as stored in the pseudo-label file.")
@click.option("--index", type=int, default=None, help="Image position in the round (first of the sheet with --grid).")
@click.option("--grid", type=int, default=None, help="A contact sheet of N images.")
@click.option("--out", required=True, type=click.Path(dir_okay=False))
@user_errors
def labels_show(run: str, round_index: int, image_id: str | None, index: int | None, grid: int | None, out: str) -> None:
    """Image, pseudo-label overlay (ignored pixels hatched) and ground truth, as a PNG."""
    from .views import show_labels

    if image_id is not None and index is not None:
        raise UserError("give --image or --index, not both")
    click.echo(f"wrote {show_labels(run, round_index, out, index=index, image_id=image_id, grid=grid)}")


@labels.command("diff")
@click.argument("run", type=click.Path(file_okay=False))
@click.argument("a", type=click.IntRange(min=0))
@click.argument("b", type=click.IntRange(min=0))
@click.option("--json", "as_json", is_flag=True)
@user_errors
def labels_diff(run: str, a: int, b: int, as_json: bool) -> None:
    """Per class: labels added, dropped and changed from round A to round B."""
    import json

    from .inspect import diff_rounds, format_diff, run_class_names

    d = diff_rounds(run, a, b)
    names = run_class_names(run)
    if as_json:
        cols = ("in_a", "in_b", "kept", "added", "dropped", "changed_out", "changed_in")
        click.echo(json.dumps({"a": a, "b": b, "unit": d.unit, "images": d.images, "class_names": names,
                               **{c: d.column(c).tolist() for c in cols}}, indent=2))
    else:
        click.echo(format_diff(d, names))


@labels.command("export")
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--round", "round_index", required=True, type=click.IntRange(min=0))
@click.option("--format", "fmt", required=True, metavar="png|cityscapes|voc|coco",
              help="png, cityscapes (segmentation); voc, coco (detection).")
@click.option("--out", required=True, help="A new or empty folder (or an earlier export, with --overwrite).")
@click.option("--images", default="link", show_default=True, metavar="link|copy|none",
              help="Put the images beside the labels as links to the data set's files, as copies, or not at all; "
                   "images rendered in memory are written as files for link and copy.")
@click.option("--split", default="train", show_default=True,
              help="Split name in the layout (ImageSets/Main/<split>.txt, annotations/instances_<split>.json, ...).")
@click.option("--overwrite", is_flag=True,
              help="Replace an earlier export in --out (never a folder holding other files).")
@user_errors
def labels_export(run: str, round_index: int, fmt: str, out: str, images: str, split: str, overwrite: bool) -> None:
    """Write one round in the layout another tool reads: label PNGs (png, cityscapes) or boxes (voc, coco)."""
    from .export import export_round

    n = export_round(run, round_index, out, fmt, images=images, split=split, overwrite=overwrite)
    click.echo(f"wrote {n} images of round {round_index} as {fmt} to {out} (images: {images})")


@main.command("list")
@click.argument("what", type=click.Choice(["adapters", "policies", "losses", "datasets"]))
@user_errors
def list_cmd(what: str) -> None:
    """List the registered adapters, policies, loss terms or data sets with their task (and kind)."""
    if what == "adapters":
        from selftrain.adapters import ADAPTERS as reg
    elif what == "policies":
        from .policies import POLICIES as reg
    elif what == "losses":
        from .losses import LOSSES as reg
    else:
        from .data import REGISTRIES

        for task, reg in REGISTRIES.items():
            for name in reg.names():
                click.echo(f"{name}  ({task})")
        return
    for name in reg.names():
        entry = reg.entry(name)
        kind = f", {entry.meta['kind']}" if "kind" in entry.meta else ""
        click.echo(f"{name}  ({', '.join(entry.tasks)}{kind})")


@main.command()
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Output folder  [default: runs/demo, runs/detdemo with --task detection]")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds, e.g. 0,1,2.")
@click.option("--recipes", "recipes_dir", default=None, type=click.Path(file_okay=False),
              help="Folder with the demo's recipes  [default: the built-in ones]")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Applied to every recipe.")
@click.option("--resume", is_flag=True, help="Continue an interrupted demo.")
@click.option("--task", type=click.Choice(["segmentation", "detection"]), default="segmentation", show_default=True,
              help="segmentation: ST/CBST/CBST-SP on street scenes; detection: ST/WST/mean teacher on shapes.")
@click.option("--quiet", is_flag=True)
@user_errors
def demo(out: str | None, seeds: str, recipes_dir: str | None, overrides: tuple[str, ...], resume: bool, task: str,
         quiet: bool) -> None:
    """Source only and every policy on an embedded synthetic benchmark, then a comparison."""
    from .catalog import builtin_root
    from .demo import run_demo

    _setup_logging(quiet)
    seed_list = parse_seeds(seeds)
    out = out or ("runs/detdemo" if task == "detection" else "runs/demo")
    click.echo(run_demo(out=Path(out), seeds=seed_list, recipes_dir=Path(recipes_dir) if recipes_dir else builtin_root(),
                        overrides=list(overrides), resume=resume, task=task))


def parse_seeds(text: str) -> list[int]:
    """``--seeds 0,1,2`` as a list of non-negative integers; anything else is a UserError."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts or not all(part.isdigit() for part in parts):
        raise UserError(f"--seeds must be comma-separated non-negative integers, e.g. 0,1,2; got {text!r}")
    return [int(part) for part in parts]


if __name__ == "__main__":
    main()
