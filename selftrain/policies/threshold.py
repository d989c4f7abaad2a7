"""Offline pseudo-label policies: ST, CBST, ST-SP and CBST-SP (Zou et al., ECCV 2018, arXiv:1810.07911).

Each class only holds state (the streaming histogram, the prior, the fitted costs); the maths is
in :mod:`selftrain.policies.functional`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from ..priors import resize_prior
from ..types import SegPrediction, SegPseudoLabels
from . import functional as F

_MAX_PASSES = 4


class ThresholdPolicy:
    """Confidence-threshold self-training: observe a target pass, ``fit(portion)``, then ``select``.

    Args:
        num_classes: classes of the segmenter; taken from the first input when None.
        class_balanced: one threshold per class (CBST, Algorithm 2) instead of one (ST, Algorithm 1).
        prior: spatial prior q [C, H, W] (CBST-SP); resized to each input size and renormalised.
        ignore_index: label of unselected pixels.

    ``observe``/``select`` take softmax probabilities [B, C, H, W] or a :class:`SegPrediction`
    holding logits (preferred: costs from logits do not saturate). ``fit(portion, replay=...)``
    gives the exact order statistics (see :mod:`selftrain.policies.functional` for the rank
    convention); without ``replay`` the costs are read off the histogram's bin edges.
    """

    offline = True

    def __init__(
        self,
        *,
        name: str,
        class_balanced: bool,
        num_classes: int | None = None,
        prior: np.ndarray | torch.Tensor | None = None,
        ignore_index: int = F.IGNORE,
    ) -> None:
        self.name = name
        self.class_balanced = class_balanced
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.prior = None if prior is None else torch.as_tensor(np.asarray(prior), dtype=torch.float32)
        self._log_prior_cache: dict[tuple[int, int], torch.Tensor] = {}
        self.reset()

    def reset(self) -> None:
        """Forget the statistics of the previous pass."""
        self.hist: torch.Tensor | None = None
        self.costs: torch.Tensor | None = None
        self.portion: float | None = None

    @property
    def thresholds(self) -> torch.Tensor:
        """Per-class thresholds ``exp(-k_c)`` [C] (all equal for ST)."""
        if self.costs is None:
            raise RuntimeError("call fit(portion) before reading thresholds")
        return torch.exp(-self.costs).float()

    @property
    def predicted_pixels(self) -> torch.Tensor:
        """Pixels predicted as each class during the observed pass [C]."""
        return self._hist().sum(dim=1)

    def observe(self, pred: torch.Tensor | SegPrediction, valid: torch.Tensor | None = None) -> None:
        """Add one batch to the statistics. ``valid`` [B, H, W] bool excludes pixels (padding)."""
        label, cost, num_classes = self._predicted_cost(pred)
        if self.hist is None:
            self.hist = F.empty_histogram(num_classes, cost.device)
        F.accumulate_histogram(self.hist, label, cost, valid)

    def fit(self, portion: float,
            replay: Callable[[], Iterable[torch.Tensor | SegPrediction]] | None = None,
            reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Thresholds for pseudo-label portion ``portion`` in (0, 1]; returns them [C].

        ``replay()`` yields the observed batches again (or ``(batch, valid)`` pairs), in any order;
        with it the costs are the exact order statistics, found in one or two more passes, else they
        are the histogram's bin edges (within ~0.22 % of the exact cost).

        ``reduce`` sums int64 counts in place over the processes that share the target set
        (``selftrain.dist.all_reduce_sum``): each process observes and replays its own shard, the
        histogram and every pass's counts are summed, so every process fits the same thresholds,
        exactly those of one process observing everything.
        """
        if not 0.0 < portion <= 1.0:
            raise ValueError(f"portion must be in (0, 1], got {portion}")
        self._reduce = reduce or (lambda t: t)
        hist = self._reduce(self._hist())
        if replay is None:
            fit = F.class_balanced_costs if self.class_balanced else F.global_costs
            self.costs = fit(hist, portion)
        else:
            self.costs = self._exact_costs(portion, replay)
        self.portion = portion
        return self.thresholds

    def _exact_costs(self, portion: float, replay: Callable[[], Iterable[Any]]) -> torch.Tensor:
        """Passes over ``replay()`` until every group's rank has its exact cost. -> [C] float64

        One pass from a geometric bin, two from an end bin, two more after a missed window: a fifth
        pass means ``replay()`` does not yield the pixels that were observed.
        """
        hist = self._hist()
        search = F.RankSearch.from_histogram(hist if self.class_balanced else hist.sum(0, keepdim=True), portion)
        for _ in range(_MAX_PASSES):
            if search.done:
                break
            for item in replay():
                pred, valid = item if isinstance(item, tuple) else (item, None)
                label, cost, _ = self._predicted_cost(pred)
                group = label if self.class_balanced else torch.zeros_like(label)
                search.count(group, cost, valid)
            self._reduce(search.below)
            self._reduce(search.cells)
            search.narrow()
        if not search.done:
            raise RuntimeError(f"no exact threshold after {_MAX_PASSES} passes: replay() must yield the observed batches")
        costs = search.costs()
        return costs if self.class_balanced else costs.expand(hist.shape[0]).clone()

    def select(self, pred: torch.Tensor | SegPrediction) -> torch.Tensor:
        """Pseudo-labels int64 [B, H, W], ``ignore_index`` where not selected."""
        return self.select_with_confidence(pred).labels

    def select_with_confidence(self, pred: torch.Tensor | SegPrediction) -> SegPseudoLabels:
        """Pseudo-labels and the softmax probability of the assigned class [B, H, W]."""
        if self.costs is None:
            raise RuntimeError("call fit(portion) before select()")
        logp = self._log_probs(pred)
        labels, _ = F.select(F.log_potentials(logp, self._log_prior(logp)), self.costs, self.ignore_index)
        conf = logp.gather(1, labels.clamp(max=logp.shape[1] - 1).unsqueeze(1)).squeeze(1).exp()
        conf = torch.where(labels == self.ignore_index, torch.zeros_like(conf), conf)
        return SegPseudoLabels(labels=labels, confidence=conf)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "hist": self.hist, "costs": self.costs, "portion": self.portion}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state of policy {state.get('name')!r} cannot load into {self.name!r}")
        self.hist, self.costs, self.portion = state["hist"], state["costs"], state["portion"]

    def _hist(self) -> torch.Tensor:
        if self.hist is None:
            raise RuntimeError("observe() at least one batch before fit()")
        return self.hist

    def _predicted_cost(self, pred: torch.Tensor | SegPrediction) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Predicted class and cost of every pixel [B, H, W] (the same values in every pass), and C."""
        if isinstance(pred, SegPrediction) and self.prior is None:
            label, cost = F.predicted_cost_from_logits(pred.logits)
            return label, cost, pred.logits.shape[1]
        logpot = self._log_potentials(pred)
        label, cost = F.predicted_cost(logpot)
        return label, cost, logpot.shape[1]

    def _log_probs(self, pred: torch.Tensor | SegPrediction) -> torch.Tensor:
        if isinstance(pred, SegPrediction):
            logp = F.log_softmax_precise(pred.logits)
        else:
            logp = F.log_probs(pred)
        if self.num_classes is not None and logp.shape[1] != self.num_classes:
            raise ValueError(f"policy expects {self.num_classes} classes, got {logp.shape[1]}")
        return logp

    def _log_potentials(self, pred: torch.Tensor | SegPrediction) -> torch.Tensor:
        logp = self._log_probs(pred)
        return F.log_potentials(logp, self._log_prior(logp))

    def _log_prior(self, logp: torch.Tensor) -> torch.Tensor | None:
        if self.prior is None:
            return None
        size = (logp.shape[-2], logp.shape[-1])
        if size not in self._log_prior_cache:
            if self.prior.shape[0] != logp.shape[1]:
                raise ValueError(f"prior has {self.prior.shape[0]} classes, the model {logp.shape[1]}")
            self._log_prior_cache[size] = torch.log(resize_prior(self.prior, size).float())
        return self._log_prior_cache[size].to(logp.device)
