"""Extra loss terms: adversarial alignment modules added to the task losses with a recipe weight.

``create_loss(name, **options)`` builds a registered term; :class:`LossTerms` holds a run's terms,
weights them and owns their discriminators' optimisers; :class:`DiscriminatorUpdate` is the step hook
that updates the discriminators. ``selftrain list losses`` prints the names.
"""

from __future__ import annotations

from typing import Any

from . import adversarial as _adversarial  # noqa: F401  (registers the terms)
from .adversarial import BSR, DANN, LossTerm, OutputSpace, bsr_loss
from .grl import ganin_coeff, grad_reverse, reverse_gradient
from .registry import LOSSES
from .terms import DiscriminatorUpdate, LossTerms, WeightedTerm


def create_loss(name: str, **options: Any) -> LossTerm:
    """A registered loss term (its constructor's keyword options); unknown names list the valid ones."""
    return LOSSES.get(name)(**options)


__all__ = ["BSR", "DANN", "DiscriminatorUpdate", "LOSSES", "LossTerm", "LossTerms", "OutputSpace", "WeightedTerm", "bsr_loss",
           "create_loss", "ganin_coeff", "grad_reverse", "reverse_gradient"]
