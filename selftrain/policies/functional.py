"""Pseudo-label selection maths for ST, CBST and CBST-SP (Zou et al., ECCV 2018, arXiv:1810.07911).

Everything here is a pure function on tensors. Confidences are handled as *costs*
``-log(potential)`` where the potential is ``p_c`` (ST, CBST) or ``q_c * p_c`` (CBST-SP): costs
are computed from logits without saturating, and ranking by increasing cost is ranking by
decreasing confidence.

Thresholds come from streaming histograms of the cost of each pixel's predicted class, kept per
class. Bins are geometric between ``COST_MIN`` and ``COST_MAX`` (bin 0 holds ``[0, COST_MIN)``),
so a cost read off a bin edge is within ``k * (r - 1) ~ 0.22 %`` of the exact order statistic
(``r`` the bin ratio): enough for ST and CBST (k < 1), not for prior-weighted potentials
(CBST-SP, k ~ 8-15, where thresholds move by ~2 %). :class:`RankSearch` makes the order statistic
exact: further passes over the same pixels histogram the float32 bit patterns of the costs inside
each class's boundary window, ``WINDOW`` patterns at a time, until the window is one pattern wide
(one pass from a geometric bin, two from the open end bins). Memory stays ``C x max(BINS, WINDOW)``
whatever the number of target pixels.

Rank convention (CBST Algorithm 2, lines 11-12, and the authors' code; §3.3's text says
``round``): ``k_c`` is the cost at 1-based rank ``floor(N_c * p)`` of the class's costs in
increasing order (confidences in decreasing order), ``N_c`` the pixels predicted as class c; a
class with ``floor(N_c * p) < 1`` keeps ``k_c = 0`` (threshold 1). Selection keeps every pixel whose
cost is ``<= k_c``, so pixels tied with the rank's value are all selected.
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
WINDOW = 65536  # float32 bit patterns (or groups of them) counted per class in a refinement pass
_PATTERN_END = 0x7F800001  # one past +inf: every non-negative non-NaN float32 pattern lies below


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


def empty_histogram(num_classes: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Exact int64 counts [C, BINS] (on the device of the costs they will count)."""
    return torch.zeros(num_classes, BINS, dtype=torch.int64, device=device)


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


def bin_lower_edge(index: torch.Tensor) -> torch.Tensor:
    """The smallest cost that falls into bin ``index`` (0 for bin 0), float64."""
    edge = torch.exp(_LOG_MIN + (index.double() - 1) * _LOG_STEP)
    return torch.where(index > 0, edge, torch.zeros_like(edge))


def global_costs(hist: torch.Tensor, portion: float) -> torch.Tensor:
    """ST (Algorithm 1): one cost ``k`` over all pixels of all classes, repeated per class. -> [C]"""
    k = _rank_cost(hist.sum(dim=0), portion)
    return torch.full((hist.shape[0],), k, dtype=torch.float64)


def class_balanced_costs(hist: torch.Tensor, portion: float) -> torch.Tensor:
    """CBST (Algorithm 2): per class ``k_c`` over the pixels predicted as class c. -> [C]"""
    return torch.tensor([_rank_cost(row, portion) for row in hist], dtype=torch.float64)


def portion_ranks(counts: torch.Tensor, portion: float) -> torch.Tensor:
    """1-based ranks ``floor(N_g * portion)`` per group; counts [G, BINS] -> [G] int64 (0: no rank)."""
    totals = counts.sum(dim=1).double()
    return torch.floor(totals * portion).long()


def cost_patterns(cost: torch.Tensor) -> torch.Tensor:
    """float32 bit patterns of non-negative costs as int64: ordered exactly like the costs."""
    return cost.float().abs().view(torch.int32).long()


def pattern_cost(pattern: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`cost_patterns`: the float32 cost of each pattern, as float64."""
    return pattern.to(torch.int32).view(torch.float32).double()


class RankSearch:
    """Exact order statistics of streamed costs, one per group (a class, or all pixels for ST).

    Each group has a target rank and a window of float32 patterns ``[lo, lo + width * WINDOW)``
    cut into ``WINDOW`` cells. A pass over the pixels counts, per group, the pixels below the window
    (``below``) and in each cell (``cells`` [G, WINDOW]); :meth:`narrow` moves the window onto the
    cell that holds the rank, until cells are one pattern wide and the rank's cost is known exactly.
    A window that misses its rank (never from a histogram's own bins) falls back to the full range.
    """

    def __init__(self, ranks: torch.Tensor, lo: torch.Tensor, width: torch.Tensor) -> None:
        self.ranks, self.lo, self.width = ranks, lo, width
        self.result = torch.full_like(ranks, -1)  # exact pattern per group once found
        self.result[ranks < 1] = 0  # no rank: cost 0, threshold 1
        self.reset_counts()

    @classmethod
    def from_histogram(cls, counts: torch.Tensor, portion: float) -> RankSearch:
        """Start from the geometric bin holding each group's rank (counts [G, BINS] int64)."""
        ranks = portion_ranks(counts, portion)
        b = torch.searchsorted(torch.cumsum(counts, dim=1), ranks.clamp_min(1).unsqueeze(1)).squeeze(1)
        b = b.clamp(max=BINS - 1)
        slack = 1e-4  # 30x the float32 rounding of cost_to_bin at the edges (<= 3.5e-6 relative, measured)
        lo = cost_patterns((bin_lower_edge(b) * (1 - slack)).float())
        top = torch.full_like(lo, _PATTERN_END)
        hi = torch.where(b == BINS - 1, top, cost_patterns((bin_upper_edge(b) * (1 + slack)).float()) + 1)
        return cls(ranks, lo, _cells(hi - lo))

    @property
    def done(self) -> bool:
        return bool((self.result >= 0).all())

    def reset_counts(self) -> None:
        self.below = torch.zeros_like(self.ranks)
        self.cells = torch.zeros(len(self.ranks), WINDOW, dtype=torch.int64, device=self.ranks.device)

    def count(self, group: torch.Tensor, cost: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Add one batch: ``group`` int64 and ``cost`` of the same shape (``valid`` False pixels skipped)."""
        g, p = group.reshape(-1), cost_patterns(cost).reshape(-1)
        if valid is not None:
            keep = valid.reshape(-1)
            g, p = g[keep], p[keep]
        open_ = (self.result < 0)[g]
        g, p = g[open_], p[open_]
        lo, width = self.lo[g], self.width[g]
        self.below += torch.bincount(g[p < lo], minlength=len(self.ranks))
        cell = torch.div(p - lo, width, rounding_mode="floor")
        inside = (p >= lo) & (cell < WINDOW)
        flat = g[inside] * WINDOW + cell[inside]  # few pixels: add them where they fall
        self.cells.view(-1).index_add_(0, flat, torch.ones_like(flat))

    def narrow(self) -> None:
        """After a pass: move each open window onto the cell holding its rank; reset the counts."""
        for i in torch.nonzero(self.result < 0).flatten().tolist():
            cum = self.below[i] + torch.cumsum(self.cells[i], 0)
            rank = self.ranks[i]
            cell = int(torch.searchsorted(cum, rank.view(1)))
            if self.below[i] >= rank or cell >= WINDOW:  # the rank lies outside the window: search all
                self.lo[i], self.width[i] = 0, _cells(torch.tensor(_PATTERN_END))
                continue
            start = self.lo[i] + cell * self.width[i]
            if self.width[i] == 1:
                self.result[i] = start
            else:
                self.lo[i], self.width[i] = start, _cells(self.width[i])
        self.reset_counts()

    def costs(self) -> torch.Tensor:
        """The exact cost at each group's rank (0 where it has none) [G] float64."""
        if not self.done:
            raise RuntimeError("RankSearch needs more passes before its costs are known")
        return pattern_cost(self.result)


def _cells(span: torch.Tensor) -> torch.Tensor:
    """Patterns per cell so that ``span`` patterns fit in ``WINDOW`` cells (ceil division)."""
    return torch.div(span + WINDOW - 1, WINDOW, rounding_mode="floor").clamp_min(1)


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
