"""Run directories and self-describing checkpoints.

- round checkpoints ``checkpoints/round_NNN.pt`` (and ``last.pt``): the model, the policy, the
  teacher, the loss terms with their discriminators' optimisers, the RNG state, the resolved recipe
  and the round's evaluation; each round builds its own optimiser, so none is kept;
- the step checkpoint ``checkpoints/step.pt``: everything the round being trained needs to continue
  at the next step (model, optimiser, schedule, GradScaler, hooks, loss terms, teacher, policy, data
  streams and their generator, every RNG); only the newest is kept, and it is removed once the
  round's checkpoint exists.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import __version__
from .errors import UserError
from .io import atomic_path, write_text_atomic
from .training import HookBase

log = logging.getLogger(__name__)
_ROUND_FILE = re.compile(r"round_(\d{3})\.pt$")


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

    def prepare(self, recipe_yaml: str, resume: bool) -> int | None:
        """Create or reopen the directory; returns the last complete round when resuming.

        A directory that already holds a run is never overwritten: without ``resume`` it is an
        error, and with it the saved recipe must equal the current one.
        """
        done = self.completed_rounds()
        if self.config.exists() and not resume:
            raise UserError(f"run directory {self.root} already holds a run; pass --resume to continue it "
                            "or choose another --out")
        if resume and self.config.exists() and self.config.read_text() != recipe_yaml:
            raise UserError(f"run directory {self.root} was made with another recipe; resume with the same "
                            "recipe and --set values, or choose another --out")
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_scratch()
        write_text_atomic(self.config, recipe_yaml)
        last = done[-1] if done else None
        truncate_metrics(self.metrics, -1 if last is None else last)
        return last

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
        self.step.unlink()
        return None


    def _remove_scratch(self) -> None:
        """Delete temporary files a killed process left behind (never a finished file)."""
        for folder in (self.root / "pseudo", self.root / "checkpoints"):
            if folder.is_dir():
                for path in folder.glob("*.tmp"):
                    path.unlink()
                for path in folder.glob(".*.tmp"):
                    path.unlink()


def truncate_metrics(path: Path, last_round: int) -> None:
    """Drop metrics lines of rounds after ``last_round`` (left by an interrupted round)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln).get("round", -1) <= last_round]
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(ln + "\n" for ln in kept))


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
                    metrics: dict | None = None, teacher: dict | None = None, loss_terms: dict | None = None) -> None:
    """Write a round checkpoint atomically; it carries the resolved recipe so it describes itself."""
    save_state(path, {
        "round": round_index, "model": model, "policy": policy, "rng": rng_state(), "recipe": recipe_yaml,
        "metrics": metrics, "selftrain_version": __version__, "teacher": teacher, "loss_terms": loss_terms,
    })


def save_state(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temporary name, renamed onto ``path`` when complete."""
    with atomic_path(path, suffix=".pt.tmp") as tmp:
        torch.save(state, tmp)


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
    """Point ``link`` at ``source``'s content (a hard link, a copy where links fail), atomically."""
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, link)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"checkpoint {file} does not exist; name a round_*.pt or last.pt of a finished run")
    try:
        state = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file
        raise UserError(f"checkpoint {file} cannot be read ({exc.__class__.__name__}); it is not a selftrain "
                        "checkpoint or is damaged") from None
    if not isinstance(state, dict) or ("model" not in state and state.get("kind") != "step"):
        raise UserError(f"checkpoint {file} is not a selftrain checkpoint (no model state)")
    return state
