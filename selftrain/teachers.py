"""Who labels the target batches of online policies: the student itself, or its EMA (mean teacher).

Offline rounds label with a frozen snapshot of the model, which is simply the adapter before the
round's fine-tuning starts (see :mod:`selftrain.pseudo`); the two teachers here serve the online
policies, which label every target batch as training goes. The engine makes the teacher when the
first online round starts, from the model that round starts from.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from .training import HookBase


class StudentTeacher:
    """The current model labels its own batches (WST: pseudo-labels regenerated every iteration)."""

    kind = "student"

    def __init__(self, student: Any) -> None:
        self.student = student

    def predict(self, images: Any) -> Any:
        return self.student.predict(images)

    def update(self, student: Any, step: int) -> None:
        """Nothing to do: the teacher is the student."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Stateless."""


class EMATeacher:
    """Mean teacher (Tarvainen & Valpola, NeurIPS 2017, arXiv:1703.01780): an exponential moving
    average of the student's weights, ``theta_t <- decay * theta_t + (1 - decay) * theta_s``.

    Buffers (BatchNorm statistics) are copied from the student. The first ``warmup`` updates use
    ``min(decay, (1 + step) / (10 + step))`` so the teacher leaves its initial weights quickly.
    """

    kind = "ema"

    def __init__(self, student: Any, *, decay: float = 0.999, warmup: bool = True) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"mean teacher decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.model = copy.deepcopy(student)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._averaged = _parameter_names(self.model)  # parameters average; buffers are copied

    def predict(self, images: Any) -> Any:
        return self.model.predict(images)

    def rate(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, student: Any, step: int) -> None:
        decay = self.rate(step)
        teacher_state, student_state = self.model.state_dict(), student.state_dict()
        for name, value in teacher_state.items():
            source = student_state[name].detach()
            if value.dtype.is_floating_point and name in self._averaged:
                value.mul_(decay).add_(source, alpha=1 - decay)
            else:
                value.copy_(source)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])


def _parameter_names(adapter: Any) -> set[str]:
    model = getattr(adapter, "model", None)
    if model is None:
        return set(adapter.state_dict())
    return {name for name, _ in model.named_parameters()}


class TeacherUpdate(HookBase):
    """Step hook: after every optimiser step the teacher follows the student (the EMA update).
    ``offset``: steps of earlier rounds, so the EMA warm-up counts steps over the whole run."""

    def __init__(self, teacher: StudentTeacher | EMATeacher, student: Any, offset: int = 0) -> None:
        self.teacher, self.student, self.offset = teacher, student, offset

    def after_step(self, step: int, losses: dict[str, torch.Tensor]) -> None:
        self.teacher.update(self.student, self.offset + step)


def make_teacher(kind: str, student: Any, **options: Any) -> StudentTeacher | EMATeacher:
    if kind == "student":
        return StudentTeacher(student)
    if kind == "ema":
        return EMATeacher(student, **options)
    raise ValueError(f"unknown teacher {kind!r}; choose student or ema")
