"""Every shipped recipe (recipes/**, subfolders included) builds its adapter, policy and loss terms.

Data are not read and weight files are not loaded: models are constructed on the ``meta`` device
(every constructor runs, so every option is checked, in about a second for all of them), a weights
file option reaches the loader but nothing is read, and a spatial prior that the user builds
(``selftrain priors build``) is replaced by a uniform one of the recipe's class count. A misspelt
model or policy option, a policy for the other task or a loss term the model cannot take fails here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import selftrain.adapters.classic
import selftrain.adapters.detection
import selftrain.adapters.segmentation
import selftrain.priors
from selftrain.build import build_adapter, build_loss_terms, build_policy
from selftrain.config import RunConfig, load_recipe
from selftrain.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))
WEIGHT_OPTIONS = ("backbone_weights", "encoder_weights")


class OfflineBuild:
    """``build_adapter`` / ``build_policy`` / ``build_loss_terms`` without files; adapters cached by what
    decides them (model section, classes, task, head learning-rate multipliers) and built on ``meta``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.weights: list[str] = []
        self._adapters: dict[str, tuple[Any, list[str]]] = {}
        for module in (selftrain.adapters.segmentation, selftrain.adapters.classic, selftrain.adapters.detection):
            monkeypatch.setattr(module, "load_weights", self._load_weights)
        real_load_prior = selftrain.priors.load_prior

        def load_prior(path: str | Path, *, num_classes: int | None = None) -> np.ndarray:
            file = Path(path) if Path(path).is_absolute() else REPO / path
            if file.is_file():  # a shipped prior is read and checked for real
                return real_load_prior(file, num_classes=num_classes)
            assert file.suffix == ".npz", path
            return np.full((num_classes, 4, 4), 1 / 16, dtype=np.float32)

        monkeypatch.setattr(selftrain.priors, "load_prior", load_prior)

    def _load_weights(self, module: torch.nn.Module, path: str, what: str) -> None:
        assert isinstance(path, str) and path, (what, path)
        self.weights.append(path)

    def adapter(self, cfg: RunConfig) -> tuple[Any, list[str]]:
        """The recipe's adapter and the weight files it asked for."""
        key = json.dumps([cfg.model.name, cfg.model.options, cfg.task, cfg.data.num_classes, cfg.data.ignore_index,
                          cfg.source_training.optim.head_lr_mult, cfg.rounds.optim.head_lr_mult], sort_keys=True)
        if key not in self._adapters:
            self.weights = []
            with torch.device("meta"):
                adapter = build_adapter(cfg)
            self._adapters[key] = (adapter, self.weights)
        return self._adapters[key]


@pytest.fixture(scope="module")
def offline():
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield OfflineBuild(monkeypatch)


def test_the_recipes_include_every_folder():
    folders = {p.parent.relative_to(REPO / "recipes").as_posix() for p in RECIPES}
    assert {".", "city2nthu", "detection", "gta2bdd", "gta2city", "synthia2city"} <= folders
    assert len(RECIPES) >= 66


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(REPO / "recipes").as_posix())
def test_every_shipped_recipe_builds(path, offline):
    cfg = load_recipe(path)
    adapter, weights = offline.adapter(cfg)
    assert getattr(adapter, "task", "segmentation") == cfg.task and adapter.num_classes == cfg.data.num_classes
    asked = [cfg.model.options[k] for k in WEIGHT_OPTIONS if cfg.model.options.get(k)]
    assert weights == asked  # a weights option the builder drops would go unnoticed otherwise
    policy = build_policy(cfg)
    assert policy is None if cfg.rounds.count == 0 else policy.name == cfg.policy.name
    terms = build_loss_terms(cfg, adapter)
    assert [e.term.name for e in terms.entries] == [spec.name for spec in cfg.losses]


@pytest.mark.parametrize("recipe, overrides, message", [
    ("gta2city/st_deeplabv2.yaml", ["model.options.dept=101"], "model.options do not fit adapter deeplabv2"),
    ("detection/wst_voc2clipart.yaml", ["model.options.backbone_weigths=w.pth"], "do not fit adapter ssd300_vgg16"),
    ("det_wst.yaml", ["policy.options.treshold=0.8"], "policy.options do not fit policy wst"),
    ("synth_cbst.yaml", ["policy.name=wst"], "policy 'wst' does not work for segmentation"),
    ("synth_cbst.yaml", ["losses=[{name: bsr}]"], "loss bsr works for detection"),
    ("det_dann.yaml", ["losses=[{name: dann, options: {tap: relu4_3}}]"], "no feature tap 'relu4_3'"),
    ("synth_cbst_sp.yaml", ["data.class_names=null", "data.num_classes=9"], "has 10 classes but the model has 9"),
])
def test_the_check_fails_for_a_broken_recipe(recipe, overrides, message, offline):
    cfg = load_recipe(REPO / "recipes" / recipe, overrides)
    with pytest.raises((ConfigError, DataError), match=message):
        adapter, _ = offline.adapter(cfg)
        build_policy(cfg)
        build_loss_terms(cfg, adapter)
