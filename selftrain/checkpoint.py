"""Run directories and self-describing checkpoints.

- round checkpoints ``checkpoints/round_NNN.pt`` (and ``last.pt``): the model, the policy, the
  teacher, the loss terms with their discriminators' optimisers, the RNG state, the resolved recipe
  and the round's metrics record; each round builds its own optimiser, so none is kept;
- the step checkpoint ``checkpoints/step.pt``: everything the round being trained needs to continue
  at the next step (model, optimiser, schedule, GradScaler, hooks, loss terms, teacher, policy, data
  streams and their generator, every RNG); only the newest is kept, and it is removed once the
  round's checkpoint exists.

A round is complete when its checkpoint exists (or, where every round file was deleted to save
space, when last.pt holds it). Its metrics line is written just before the
checkpoint, so ``--resume`` drops the lines of rounds after the newest checkpoint and restores
from the checkpoints the record of a checkpointed round whose line is missing: metrics.jsonl
holds each complete round once, whatever moment a run was killed at. One process at a time uses
a run folder (an exclusive lock on ``<run>/.lock``, dropped by the kernel however the process ends).

Under torchrun rank 0 alone locks, prepares and writes the folder (:func:`save_state` and
:func:`link_atomic` do nothing on the other ranks); the others wait until rank 0 has prepared it
(:meth:`RunDir.open` hands them its outcome, an error included) and only then read from it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
import yaml

from . import __version__, dist
from .errors import UserError
from .io import atomic_path, write_text_atomic
from .training import HookBase

log = logging.getLogger(__name__)
_ROUND_FILE = re.compile(r"round_(\d{3})\.pt$")
_LOCK = ".lock"
# errno values that say a write failed for want of room or rights (not that an input is bad)
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM}


class WriteError(UserError):
    """A file of the run folder cannot be written (disk full, read-only folder); ``path`` names it.

    Every write is atomic, so nothing is lost: free space or make the folder writable, then resume.
    """

    def __init__(self, path: Path, exc: OSError) -> None:
        self.path = Path(path)
        self.errno = exc.errno
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        super().__init__(f"cannot write {self.path}: {reason}; free disk space or make the folder writable, "
                         "then continue with --resume")


@contextlib.contextmanager
def writing(path: Path, *, among_reads: bool = False) -> Iterator[None]:
    """Raise a :class:`WriteError` naming ``path`` for an ``OSError`` of the writes in the block.

    ``torch.save`` reports a failed write as a ``RuntimeError`` whose context is the ``OSError``.
    With ``among_reads`` the block also reads inputs: only an error that says a write lacked room or
    rights, on no named file or one beside ``path``, is converted; a bad input keeps its own error.
    """
    try:
        yield
    except (OSError, RuntimeError) as exc:
        error = exc if isinstance(exc, OSError) else exc.__context__
        if not isinstance(error, OSError):
            raise
        if among_reads and (error.errno not in _WRITE_ERRNOS or not _beside(error.filename, path)):
            raise
        raise WriteError(path, error) from None


def _beside(filename: Any, path: Path) -> bool:
    return filename is None or Path(os.fsdecode(filename)).resolve().parent == Path(path).resolve().parent


@dataclass(frozen=True)
class RunDir:
    """``runs/<name>/``: config.yaml, metrics.jsonl, pseudo/, checkpoints/, eval/, plots/."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    def pseudo(self, round_index: int) -> Path:
        return self.root / "pseudo" / f"round_{round_index:03d}.h5"

    def checkpoint(self, round_index: int) -> Path:
        return self.root / "checkpoints" / f"round_{round_index:03d}.pt"

    @property
    def last(self) -> Path:
        return self.root / "checkpoints" / "last.pt"

    @property
    def step(self) -> Path:
        return self.root / "checkpoints" / "step.pt"

    def eval(self, round_index: int) -> Path:
        return self.root / "eval" / f"round_{round_index:03d}.json"

    def completed_rounds(self) -> list[int]:
        folder = self.root / "checkpoints"
        if not folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _ROUND_FILE.search(p.name)))

    @contextlib.contextmanager
    def open(self, recipe_yaml: str, resume: bool) -> Iterator[int | None]:
        """Hold the folder for a run: refuse a folder that is not a run, lock it, prepare it; yields
        the last complete round when resuming (None: start at round 0). The lock goes with the block.

        Under torchrun rank 0 does all of this; the other ranks wait for its outcome and yield the
        same round, or raise its error (printed once, by rank 0)."""
        if not dist.is_main():
            yield _outcome_of_rank_zero(None)
            return
        with contextlib.ExitStack() as held:
            try:
                self._refuse_foreign()
                held.enter_context(run_lock(self.root))
                last = self.prepare(recipe_yaml, resume)
            except Exception as exc:
                _outcome_of_rank_zero(exc)
                raise dist.stopped_everywhere(exc)
            yield _outcome_of_rank_zero(last)

    def prepare(self, recipe_yaml: str, resume: bool) -> int | None:
        """Make the locked directory ready; returns the last complete round when resuming.

        A directory that holds a run's progress (a round or step checkpoint, pseudo-labels) is never
        overwritten: without ``resume`` it is an error, and with it the saved recipe must equal the
        current one. One that holds none (the run failed before its first checkpoint) takes the new
        recipe, so a corrected rerun needs nothing deleted.
        """
        progress = self._holds_progress()
        if progress and not resume:
            raise UserError(f"run directory {self.root} already holds a run; pass --resume to continue it "
                            "or choose another --out")
        last = self._resume_point() if resume else None
        state = self.round_state(last) if last is not None else None  # readable, before anything changes
        if progress:
            saved = self._saved_recipe(state)
            if saved is not None and saved != recipe_yaml:
                raise UserError(f"run directory {self.root} was made with another recipe; resume with the same "
                                "recipe and --set values, or choose another --out")
        elif self.config.exists() and self.config.read_bytes() != recipe_yaml.encode():
            log.info("run directory %s holds no checkpoint yet: it starts afresh with this recipe", self.root)
        metrics = self._whole_metrics(last)  # every record checked before the first write
        if last is not None and not _same_file(self.last, self.checkpoint(last)) and self.checkpoint(last).is_file():
            with writing(self.last):
                link_atomic(self.checkpoint(last), self.last)  # a kill can come between the two
        with writing(self.root):
            self._remove_scratch()
        with writing(self.config):
            write_text_atomic(self.config, recipe_yaml)
        self._write_metrics(metrics)
        return last

    def _saved_recipe(self, state: dict[str, Any] | None) -> str | None:
        """The recipe the run was made with: config.yaml, else (deleted) the newest round checkpoint's;
        a config.yaml that is not a recipe is an error naming it."""
        if not self.config.exists():
            return state.get("recipe") if state is not None else None
        try:
            text = self.config.read_text(encoding="utf-8")
            ok = isinstance(yaml.safe_load(text), dict)
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            ok = False
        if not ok:
            raise UserError(f"{self.config} is damaged (not a recipe); restore it, or delete it and rerun with "
                            "--resume: the recipe is then checked against the newest checkpoint's")
        return text

    def round_file(self, round_index: int) -> Path:
        """Complete round ``round_index``'s checkpoint: its round file, else last.pt (which holds it)."""
        path = self.checkpoint(round_index)
        return path if path.is_file() else self.last

    def round_state(self, round_index: int) -> dict[str, Any]:
        """The state of :meth:`round_file`; a damaged one is named with what to delete to resume
        from the round before."""
        path = self.round_file(round_index)
        try:
            return load_checkpoint(path)
        except UserError:
            also = " and last.pt" if path != self.last and _same_file(path, self.last) else ""
            before = max((r for r in self.completed_rounds() if r < round_index), default=None)
            then = "the start" if before is None else f"round {before}"
            raise UserError(f"checkpoint {path} is damaged and cannot be read; delete it{also} and rerun with "
                            f"--resume to continue from {then}") from None

    def step_state(self, recipe_yaml: str, round_index: int) -> dict[str, Any] | None:
        """The step checkpoint of round ``round_index`` made with this recipe, or None (absent, stale
        or of another round: a stale one is removed)."""
        if not self.step.exists():
            return None
        try:
            state = load_checkpoint(self.step)
        except UserError as exc:  # damaged after it was written: the round checkpoint still holds
            log.warning("%s; resuming from the last round checkpoint instead", exc)
            return None
        if state.get("kind") == "step" and state.get("round") == round_index and state.get("recipe") == recipe_yaml:
            return state
        if dist.is_main():
            with writing(self.step):
                self.step.unlink(missing_ok=True)
        return None

    def records(self) -> list[dict[str, Any]]:
        """metrics.jsonl's round records (see :func:`read_records`)."""
        return read_records(self.metrics)

    # -- what the folder holds ---------------------------------------------------------------------

    def _refuse_foreign(self) -> None:
        """Before anything is written: ``--out`` must be new, empty, or a run folder."""
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"--out {self.root} is a file; choose a folder for the run")
        if self.root.is_dir() and not self.config.exists() and any(p.name != _LOCK for p in self.root.iterdir()):
            raise UserError(f"--out {self.root} is a folder that holds no selftrain run (no config.yaml); choose a "
                            "new or empty folder")

    def _holds_progress(self) -> bool:
        folder = self.root / "pseudo"
        return bool(self.completed_rounds() or self.last.exists() or self.step.exists()
                    or (folder.is_dir() and any(folder.glob("round_*.h5"))))

    def _resume_point(self) -> int | None:
        """The newest complete round: the newest round file, with last.pt pointed at it (a kill can
        come between the two); last.pt's round where no round file is left (deleted to save space)."""
        rounds = self.completed_rounds()
        if rounds:
            return rounds[-1]
        if not self.last.is_file():
            return None
        try:
            return int(load_checkpoint(self.last)["round"])
        except (UserError, KeyError, TypeError, ValueError):
            raise UserError(f"checkpoint {self.last} is damaged and cannot be read; delete it and rerun with "
                            "--resume to start again from round 0") from None

    def _whole_metrics(self, last: int | None) -> str:
        """metrics.jsonl as it must be: one record per complete round, in round order; the lines of
        later rounds (left by an interrupted round) go, a checkpointed round's missing line comes back
        from its checkpoint."""
        kept: dict[int, str] = {}
        for record in self.records():
            if last is not None and record["round"] <= last:
                kept[record["round"]] = json.dumps(record)
        if last is not None:
            for r in sorted({*(r for r in self.completed_rounds() if r <= last), last} - kept.keys()):
                if (record := load_checkpoint(self.round_file(r)).get("record")) is not None:
                    kept[r] = json.dumps(record)
        return "".join(kept[r] + "\n" for r in sorted(kept))

    def _write_metrics(self, text: str) -> None:
        """Replace metrics.jsonl with ``text``, only when that changes the file."""
        current = self.metrics.read_bytes() if self.metrics.is_file() else None
        if current is not None or text:
            if current != text.encode():
                with writing(self.metrics):
                    write_text_atomic(self.metrics, text)

    def _remove_scratch(self) -> None:
        """Delete temporary files a killed process left behind (never a finished file)."""
        for folder in (self.root / "pseudo", self.root / "checkpoints"):
            if folder.is_dir():
                for path in folder.glob("*.tmp"):
                    path.unlink()
        for folder in (self.root, self.root / "eval", self.root / "plots"):
            if folder.is_dir():
                for path in folder.glob(".*.tmp"):  # atomic_path's temporary names
                    path.unlink()


def _outcome_of_rank_zero(outcome: Any) -> Any:
    """Rank 0's ``outcome`` of preparing the run folder on every rank: its value, or on the other
    ranks a :class:`UserError` carrying rank 0's error message (an exception passes through on rank 0)."""
    if not dist.active():
        return outcome
    shared = dist.broadcast_object(("error", str(outcome)) if isinstance(outcome, Exception) else ("ok", outcome))
    if dist.is_main() or shared[0] == "ok":
        return outcome if dist.is_main() else shared[1]
    raise dist.stopped_everywhere(UserError(shared[1]))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


@contextlib.contextmanager
def run_lock(root: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``<root>/.lock`` for the block, the holder's PID written in it.

    Another process holding it is a one-line error naming it; the kernel releases the lock when the
    holder ends, however it ends, so a killed run never leaves its folder locked.
    """
    path = root / _LOCK
    with writing(path):
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise UserError(f"run directory {root} is in use by process {holder}; wait until that run ends "
                            "(or stop it), or choose another --out") from None
        except OSError as exc:  # a file system without locks
            log.warning("cannot lock %s (%s); do not start a second run on this folder", path, os.strerror(exc.errno))
        with writing(path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def read_records(path: Path, check: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """The round records of a metrics.jsonl, in file order ([] when it is absent).

    A last line cut short (a kill or a full disk while it was written: its round has no checkpoint
    yet and is redone) is dropped with a warning; a damaged line before it is a one-line error.
    ``check`` may refuse a record that parses (ValueError saying what is wrong): the readers of
    ``labels summary`` and the plots ask for the fields they use.
    """
    if not path.is_file():
        return []
    try:
        lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror or exc.__class__.__name__}); restore it or rerun "
                        "with --resume") from None
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    records = []
    for i, (n, line) in enumerate(numbered):
        try:
            record = _record(line)
            if check is not None:
                check(record)
        except ValueError as exc:
            if i == len(numbered) - 1:
                log.warning("%s line %d is cut short (an interrupted write); it is dropped", path, n)
                break
            raise UserError(f"{path} line {n} is damaged ({exc}): the file was edited; delete that line and continue "
                            "with --resume (a checkpointed round's record comes back from its checkpoint)") from None
        records.append(record)
    return records


def _record(line: str) -> dict[str, Any]:
    """One parsed round record; ValueError saying what is wrong otherwise."""
    try:
        record = json.loads(line)
    except ValueError:
        raise ValueError("not JSON") from None
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    number = record.get("round")
    if isinstance(number, bool) or not isinstance(number, int) or number < 0:
        raise ValueError("no round number")
    return record


def rng_state() -> dict[str, Any]:
    """Python's, NumPy's and torch's generators (CPU, and every CUDA device when there is one)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, *, round_index: int, model: dict, recipe_yaml: str, policy: dict | None = None,
                    record: dict | None = None, teacher: dict | None = None, loss_terms: dict | None = None) -> None:
    """Write a round checkpoint atomically; it carries the resolved recipe so it describes itself, and
    the round's metrics record so metrics.jsonl can be made whole from the checkpoints."""
    save_state(path, {
        "round": round_index, "model": model, "policy": policy, "rng": rng_state(), "recipe": recipe_yaml,
        "metrics": (record or {}).get("eval"), "record": record, "selftrain_version": __version__,
        "teacher": teacher, "loss_terms": loss_terms,
    })


def save_state(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temporary name, renamed onto ``path`` when complete; a failed write is a
    :class:`WriteError` (through a file object, torch keeps the ``OSError`` and its errno). Under
    torchrun only rank 0 writes."""
    if not dist.is_main():
        return
    with writing(path), atomic_path(path, suffix=".pt.tmp") as tmp:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)


class StepCheckpoint(HookBase):
    """Step hook: ``save(steps_done)`` after every ``every`` steps (the engine assembles the state)."""

    def __init__(self, every: int, save: Callable[[int], None]) -> None:
        if every < 1:
            raise ValueError(f"checkpoint.every_steps must be >= 1, got {every}")
        self.every, self.save = every, save

    def after_step(self, step: int, losses: dict[str, torch.Tensor]) -> None:
        if (step + 1) % self.every == 0:
            self.save(step + 1)


def link_atomic(source: Path, link: Path) -> None:
    """Point ``link`` at ``source``'s content (a hard link, a copy where links fail), atomically
    (rank 0 only under torchrun)."""
    if not dist.is_main():
        return
    tmp = link.with_name(f".{link.name}.tmp")
    with writing(link):
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, link)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's state, its tensors mapped from the file rather than read (they are read when
    used, so checking a checkpoint before loading it costs little); a damaged file is a UserError."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"checkpoint {file} does not exist; name a round_*.pt or last.pt of a finished run")
    try:
        state = _torch_load(file)
    except Exception as exc:  # a truncated or foreign file
        raise UserError(f"checkpoint {file} cannot be read ({exc.__class__.__name__}); it is not a selftrain "
                        "checkpoint or is damaged") from None
    if not isinstance(state, dict) or ("model" not in state and state.get("kind") != "step"):
        raise UserError(f"checkpoint {file} is not a selftrain checkpoint (no model state)")
    return state


def _torch_load(file: Path) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # mmap needs torch's zip format; an older file loads the plain way (or fails again)
        return torch.load(file, map_location="cpu", weights_only=False)


def load_model(adapter: Any, state: dict[str, Any], file: str | Path, *, recipe_yaml: str) -> None:
    """Load ``state``'s model into ``adapter`` once :func:`check_model` finds it fits."""
    check_model(state, file, recipe_yaml=recipe_yaml, expected=adapter.state_dict())
    adapter.load_state_dict(state["model"])


def load_weights(adapter: Any, path: str | Path, *, recipe_yaml: str) -> None:
    """Load the model of checkpoint ``path`` into ``adapter`` (``model.checkpoint``, ``evaluate``)."""
    load_model(adapter, load_checkpoint(path), path, recipe_yaml=recipe_yaml)


def check_model(state: dict[str, Any], file: str | Path, *, recipe_yaml: str,
                expected: Mapping[str, torch.Tensor]) -> None:
    """Refuse, before any tensor is loaded, a checkpoint whose model is not the one ``recipe_yaml``
    builds: first by the recipe stored in it (task, model, classes), then by parameter names and
    shapes (``expected``: the model's state dict), which also covers a file without a recipe."""
    mine = _model_identity(recipe_yaml)
    theirs = _model_identity(state["recipe"]) if isinstance(state.get("recipe"), str) else None
    fix = "use the recipe it was made with (stored in it, and as config.yaml in its run folder) or a checkpoint of this model"
    if theirs is not None and {k: theirs[k] for k in ("task", "model", "num_classes")} != \
            {k: mine[k] for k in ("task", "model", "num_classes")}:
        raise UserError(f"checkpoint {file} holds {_describe(theirs)} but this recipe builds {_describe(mine)}; {fix}")
    mismatch = _first_mismatch(state.get("model"), expected)
    if mismatch is not None:
        options = "" if theirs is None or theirs["options"] == mine["options"] else \
            f" (made with model.options {theirs['options']}, this recipe has {mine['options']})"
        raise UserError(f"checkpoint {file} does not fit {_describe(mine)}: {mismatch}{options}; {fix}")


def _model_identity(recipe_yaml: str) -> dict[str, Any]:
    try:
        recipe = yaml.safe_load(recipe_yaml)
        return {"task": recipe.get("task"), "model": recipe["model"]["name"],
                "options": recipe["model"].get("options") or {}, "num_classes": recipe["data"]["num_classes"]}
    except (yaml.YAMLError, AttributeError, KeyError, TypeError):
        return {"task": None, "model": "an unknown model", "options": {}, "num_classes": None}


def _describe(identity: dict[str, Any]) -> str:
    return f"{identity['model']} ({identity['task']}, {identity['num_classes']} classes)"


def _first_mismatch(stored: Any, expected: Mapping[str, torch.Tensor]) -> str | None:
    """The first parameter or buffer that is missing, extra or of another shape, in words."""
    if not isinstance(stored, Mapping):
        return "it holds no model state dict"
    for name, tensor in expected.items():
        if name not in stored:
            return f"it has no {name}"
        value = stored[name]
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else None
        if shape != tuple(tensor.shape):
            return f"{name} is {list(shape) if shape is not None else type(value).__name__} there, {list(tensor.shape)} here"
    extra = next((name for name in stored if name not in expected), None)
    return None if extra is None else f"it has {extra}, which this model lacks"
