"""The interfaces the engine, the tasks and the builders rely on, as ``typing.Protocol`` classes.

Every registry entry satisfies one of them, and the contract tests check it (``isinstance`` on
these runtime-checkable protocols checks that the members exist; the tests then call them). They
are what an extension implements: a new adapter, policy, teacher, loss term or callback needs
nothing else. Shapes and units are in the docstrings of ``selftrain/types.py``.
"""

from __future__ import annotations

from typing import Any, Iterator, Literal, Protocol, Sequence, runtime_checkable

import torch
from torch.utils.data import Dataset

from .types import DetPrediction, SegPrediction, StepOutputs


@runtime_checkable
class Adapter(Protocol):
    """What both kinds of model share: train/eval passes, parameters, state, device."""

    task: str

    def forward_train(self, images: Any, targets: Any = None) -> StepOutputs: ...

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...

    def head_parameters(self) -> list[torch.nn.Parameter] | None:
        """The classifier on top of the backbone, trained at ``optim.head_lr_mult`` x the rate; None
        when the model has no separate head."""

    def feature_channels(self) -> dict[str, int]:
        """Named feature taps in ``forward_train``'s ``features`` and their channels (may be empty)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...

    def to(self, device: str | torch.device) -> Adapter: ...


@runtime_checkable
class SegmentationAdapter(Adapter, Protocol):
    """``predict(images [B, 3, H, W])`` in eval mode without gradients: logits [B, C, H, W]."""

    num_classes: int
    ignore_index: int

    def predict(self, images: torch.Tensor) -> SegPrediction: ...


@runtime_checkable
class DetectionAdapter(Adapter, Protocol):
    """``predict(images)``: one :class:`DetPrediction` per image; ``dense_logits``: True when
    ``forward_train``'s logits hold one row per default box (SSD), which BSR needs.
    ``feature_taps`` declares the backbone maps a loss term may ``request_taps`` (they then appear
    in ``StepOutputs.features``); ``request_rois`` fills ``StepOutputs.rois`` (two-stage detectors;
    a TapError elsewhere)."""

    num_classes: int
    dense_logits: bool

    def predict(self, images: Any) -> list[DetPrediction]: ...

    def feature_taps(self) -> dict[str, Any]: ...

    def request_taps(self, names: Sequence[str]) -> dict[str, Any]: ...

    def request_rois(self, *, pooled: bool = False) -> None: ...


@runtime_checkable
class OfflinePolicy(Protocol):
    """Labels the whole target set between rounds: ``reset``, then ``observe`` every batch of
    predictions, ``fit(portion)`` the thresholds, ``select`` per batch (CBST Algorithms 1-2)."""

    name: str
    offline: Literal[True]

    def reset(self) -> None: ...

    def observe(self, pred: SegPrediction) -> None: ...

    def fit(self, portion: float) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class OnlinePolicy(Protocol):
    """Labels every target batch as the model trains; ``teacher`` names the teacher it wants
    (``student`` or ``ema``) and ``threshold`` is the confidence the round record reports."""

    name: str
    offline: Literal[False]
    teacher: str
    strong_augment: bool
    threshold: float

    def teacher_options(self) -> dict[str, Any]: ...


@runtime_checkable
class Teacher(Protocol):
    """Predicts for the online policies; ``update`` follows the student after each optimiser step."""

    def predict(self, images: Any) -> Any: ...

    def update(self, student: Any, step: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class Task(Protocol):
    """Segmentation or detection: batches, augmentation, the supervised step, evaluation, and what
    the labelling pipeline (:mod:`selftrain.pseudo`) needs: a labeller for the policy, the model's
    predictions over (a shard of) the target set, and a sink that counts and writes the labels."""

    def augment(self, dataset: Dataset, mine_classes: Sequence[int] = ()) -> Dataset: ...

    def images(self, batch: dict[str, Any], device: str) -> Any: ...

    def supervised_step(self, adapter: Any, batch: dict[str, Any], device: str) -> StepOutputs: ...

    def evaluate(self, adapter: Any, dataset: Dataset, *, device: str, desc: str) -> dict[str, Any]: ...

    def online_step(self, adapter: Any, teacher: Any, policy: Any, batch: dict[str, Any], *, device: str,
                    progress: float) -> StepOutputs: ...

    def labeller(self, policy: Any, *, portion: float, progress: float, device: str) -> Any: ...

    def predictions(self, model: Any, dataset: Dataset, scratch: Any, *, device: str, offline: bool) -> Any: ...

    def sink(self, dataset: Dataset) -> Any: ...


@runtime_checkable
class LossTerm(Protocol):
    """An extra loss of a recipe's ``losses:`` list (see ``selftrain/losses``): ``needs`` says what
    the step must hand over, ``attach`` checks the model and builds the term's layers, ``forward``
    gives the model's (unweighted) losses, ``discriminator_losses`` those of a separately trained
    discriminator, ``updates`` the term's optimiser updates in the order they run after the model's
    step (``selftrain.losses.Update``: name, parameters, loss closure or None, optimiser spec,
    schedule), ``take_metrics`` what the term recorded for the logs since the last call."""

    name: str
    needs: frozenset[str]
    tasks: tuple[str, ...]
    separate_discriminator: bool

    def attach(self, adapter: Any, task: str) -> None: ...

    def forward(self, step: Any) -> dict[str, torch.Tensor]: ...

    def discriminator_losses(self, step: Any) -> dict[str, torch.Tensor]: ...

    def updates(self) -> list[Any]: ...

    def take_metrics(self) -> dict[str, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


@runtime_checkable
class Callback(Protocol):
    """Told about each finished round and the end of the run (metrics file, plots, console)."""

    def on_round_end(self, *, record: dict[str, Any], run_dir: Any, class_names: Sequence[str]) -> None: ...

    def on_run_end(self, *, records: list[dict[str, Any]]) -> None: ...
