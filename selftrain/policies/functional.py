"""Pseudo-label selection maths for ST, CBST and CBST-SP (Zou et al., ECCV 2018, arXiv:1810.07911).

Everything here is a pure function on tensors. Confidences are handled as *costs*
``-log(potential)`` where the potential is ``p_c`` (ST, CBST) or ``q_c * p_c`` (CBST-SP): costs
are computed from logits without saturating, and ranking by increasing cost is ranking by
decreasing confidence.

Thresholds come from streaming histograms of the cost of each pixel's predicted class, kept per
class. Bins are geometric between ``COST_MIN`` and ``COST_MAX`` (bin 0 holds ``[0, COST_MIN)``),
so the threshold ``t = exp(-k)`` read off a bin edge is within ``t * k * (r - 1) <= 8.4e-4`` of the
exact order statistic for every ``k`` (``r`` the bin ratio), while memory stays ``C x BINS``
whatever the number of target pixels.
"""

from __future__ import annotations

import math

import torch

COST_MIN = 1e-30
COST_MAX = 1e2
BINS = 32768
_LOG_MIN = math.log(COST_MIN)
_LOG_STEP = (math.log(COST_MAX) - _LOG_MIN) / (BINS - 1)
IGNORE = 255


def _tail(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(z - z_max, argmax, sum_{j != argmax} exp(z_j - z_max))`` over dim 1, keepdim."""
    z = logits.float()
    zmax, arg = z.max(dim=1, keepdim=True)
    d = z - zmax
    return d, arg, torch.exp(d).scatter_(1, arg, 0.0).sum(dim=1, keepdim=True)


def log_softmax_precise(logits: torch.Tensor) -> torch.Tensor:
    """``log softmax`` over dim 1 that does not saturate for confident pixels.

    ``log p_max = -log1p(sum_{j != argmax} exp(z_j - z_max))`` keeps costs down to ~1e-38 in
    float32, where ``torch.log_softmax`` returns exactly 0 once the margin passes ~17.

    Shape: logits [B, C, H, W] -> [B, C, H, W] float32.
    """
    d, _, others = _tail(logits)
    return d - torch.log1p(others)


def predicted_cost_from_logits(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax class and its cost ``-log p_max`` straight from logits, without the full log-softmax.

    Equals ``predicted_cost(log_softmax_precise(logits))``. Shape: [B, C, H, W] -> ([B, H, W], [B, H, W]).
    """
    _, arg, others = _tail(logits)
    return arg.squeeze(1), torch.log1p(others.squeeze(1))


def log_probs(probs: torch.Tensor, eps: float = 1e-30) -> torch.Tensor:
    """Log of softmax probabilities given as probabilities. Shape: [B, C, H, W]."""
    return torch.log(probs.float().clamp_min(eps))


def log_potentials(logp: torch.Tensor, log_prior: torch.Tensor | None = None) -> torch.Tensor:
    """``log p`` plus ``log q`` (CBST-SP eq. 8); ``log_prior`` [C, H, W] broadcasts over the batch."""
    return logp if log_prior is None else logp + log_prior.unsqueeze(0)


def predicted_cost(logpot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted class and its cost ``-max_c log potential``. Shapes: [B,C,H,W] -> ([B,H,W], [B,H,W])."""
    best, label = logpot.max(dim=1)
    return label, (-best).clamp_min(0.0)


def cost_to_bin(cost: torch.Tensor) -> torch.Tensor:
    """Histogram bin of each cost: 0 for ``cost < COST_MIN``, geometric bins above, last bin open."""
    safe = cost.clamp_min(COST_MIN)
    idx = torch.floor((torch.log(safe) - _LOG_MIN) / _LOG_STEP).long() + 1
    idx = torch.where(cost < COST_MIN, torch.zeros_like(idx), idx)
    return idx.clamp_(0, BINS - 1)


def bin_upper_edge(index: torch.Tensor) -> torch.Tensor:
    """The largest cost that falls into bin ``index`` (the bin's upper edge), float64."""
    return torch.exp(_LOG_MIN + index.double() * _LOG_STEP)


def empty_histogram(num_classes: int) -> torch.Tensor:
    return torch.zeros(num_classes, BINS, dtype=torch.int64)


def accumulate_histogram(
    hist: torch.Tensor, label: torch.Tensor, cost: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Add pixels to the per-class cost histogram in place.

    Shape: hist [C, BINS]; label, cost, valid [B, H, W] (``valid`` False pixels are skipped).
    """
    flat = label.reshape(-1) * BINS + cost_to_bin(cost).reshape(-1)
    if valid is not None:
        flat = flat[valid.reshape(-1)]
    hist += torch.bincount(flat, minlength=hist.numel()).view_as(hist)
    return hist


def _rank_cost(counts: torch.Tensor, portion: float) -> float:
    """Cost at 1-based rank ``floor(N * portion)`` in increasing cost; 0 (threshold 1) when < 1."""
    rank = math.floor(int(counts.sum()) * portion)
    if rank < 1:
        return 0.0
    b = int(torch.searchsorted(torch.cumsum(counts, 0), torch.tensor(rank)))
    return float(bin_upper_edge(torch.tensor(b)))


def global_costs(hist: torch.Tensor, portion: float) -> torch.Tensor:
    """ST (Algorithm 1): one cost ``k`` over all pixels of all classes, repeated per class. -> [C]"""
    k = _rank_cost(hist.sum(dim=0), portion)
    return torch.full((hist.shape[0],), k, dtype=torch.float64)


def class_balanced_costs(hist: torch.Tensor, portion: float) -> torch.Tensor:
    """CBST (Algorithm 2): per class ``k_c`` over the pixels predicted as class c. -> [C]"""
    return torch.tensor([_rank_cost(row, portion) for row in hist], dtype=torch.float64)


def select(logpot: torch.Tensor, costs: torch.Tensor, ignore_index: int = IGNORE) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-labels ``argmax_c potential_c / t_c`` where that ratio is >= 1, else ``ignore_index``.

    Works in log space: ``log(potential_c / t_c) = log potential_c + k_c``.
    Shape: logpot [B, C, H, W], costs [C] -> (labels int64 [B, H, W], log ratio float32 [B, H, W]).
    """
    score = logpot + costs.to(logpot.dtype).view(1, -1, 1, 1)
    best, label = score.max(dim=1)
    label = torch.where(best >= 0, label, torch.full_like(label, ignore_index))
    return label, best


def rare_classes(predicted_pixels: torch.Tensor, share: float = 1e-3) -> torch.Tensor:
    """Classes predicted on fewer than ``share`` of the target pixels (CBST §5 hard-sample mining)."""
    total = predicted_pixels.sum().clamp_min(1)
    return torch.nonzero(predicted_pixels.double() / total < share).flatten()
