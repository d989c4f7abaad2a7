"""Extra loss terms: adversarial alignment modules added to the task losses with a recipe weight.

One file per term (``bsr``, ``dann``, ``output_space``), each registering itself in ``LOSSES``;
``create_loss(name, **options)`` builds one. :class:`LossTerms` holds a run's terms, weights them
and owns their optimisers; :class:`Update` is one optimiser update of a term's parameters and
:class:`DiscriminatorUpdate` the step hook that runs them in order after the model's step.
``functional`` holds the domain losses as pure functions. ``selftrain list losses`` prints the names.
"""

from __future__ import annotations

from typing import Any

from .base import SOURCE, TARGET, LossTerm, Update, frozen
from .bsr import BSR, bsr_loss
from .dann import DANN
from .functional import bce_domain_loss, domain_accuracy, focal_domain_loss, least_squares_domain_loss
from .grl import ganin_coeff, grad_reverse, reverse_gradient
from .output_space import OutputSpace
from .registry import LOSSES
from .terms import DiscriminatorUpdate, LossTerms, WeightedTerm, sync_gradients


def create_loss(name: str, **options: Any) -> LossTerm:
    """A registered loss term (its constructor's keyword options); unknown names list the valid ones."""
    return LOSSES.get(name)(**options)


__all__ = ["BSR", "DANN", "DiscriminatorUpdate", "LOSSES", "LossTerm", "LossTerms", "OutputSpace", "SOURCE", "TARGET",
           "Update", "WeightedTerm", "bce_domain_loss", "bsr_loss", "create_loss", "domain_accuracy",
           "focal_domain_loss", "frozen", "ganin_coeff", "grad_reverse", "least_squares_domain_loss",
           "reverse_gradient", "sync_gradients"]
