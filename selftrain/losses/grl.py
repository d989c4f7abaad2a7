"""Gradient reversal (Ganin & Lempitsky, ICML 2015): identity forward, ``-coeff x grad`` backward."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, coeff: float) -> torch.Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.coeff * grad, None


def grad_reverse(x: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
    """``x`` unchanged; the gradient that flows back through it is multiplied by ``-coeff``."""
    return _GradReverse.apply(x, coeff)


@contextmanager
def reverse_gradient(module: nn.Module, coeff: float = 1.0) -> Iterator[None]:
    """Inside the block, ``module``'s output passes through :func:`grad_reverse`: every loss computed
    from a forward pass made there trains the layers after ``module`` normally and the layers up to
    it against that loss (the GRL after relu4_3 of BSR, Kim et al. 2019, Fig. 4)."""
    handle = module.register_forward_hook(lambda _m, _i, out: grad_reverse(out, coeff))
    try:
        yield
    finally:
        handle.remove()


def ganin_coeff(progress: float, gamma: float = 10.0) -> float:
    """DANN's schedule for the reversal coefficient: ``2 / (1 + exp(-gamma p)) - 1``, 0 -> 1 over training."""
    return 2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0
