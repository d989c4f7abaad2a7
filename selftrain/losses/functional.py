"""Domain-classifier losses and accuracy as pure functions (no state, no parameters).

Labels follow the discriminators of this package: source = 0, target = 1. A *one-logit* classifier
gives one logit per example or location (any shape), read through a sigmoid as p(target); a
*two-way* classifier gives logits [N, 2], read through a softmax (class 0 = source, 1 = target), as
HTCN's and SWDA's image-level discriminators. Every loss is a mean over examples (and locations).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bce_domain_loss(logits: torch.Tensor, domain: float) -> torch.Tensor:
    """Binary cross-entropy of a one-logit domain classifier against one domain (DANN, Ganin &
    Lempitsky 2015; DA Faster R-CNN's image-level classifier).

    Shape: logits [*] (any shape, one logit per location), domain 0 (source) or 1 (target) -> scalar,
    the mean over the locations of ``-d log s(x) - (1 - d) log(1 - s(x))``.
    """
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, domain))


def least_squares_domain_loss(scores: torch.Tensor, domain: float) -> torch.Tensor:
    """Least-squares domain loss (LSGAN, Mao et al. 2017; iFAN's image-level classifiers, Eq. 1):
    the mean of ``(D(x) - d)^2``. ``scores`` are used as given: pass ``logits.sigmoid()`` for a
    probability, the raw outputs for LSGAN's unbounded form (iFAN does not say which).

    Shape: scores [*], domain 0 or 1 -> scalar.
    """
    return (scores.float() - domain).pow(2).mean()


def focal_domain_loss(logits: torch.Tensor, domain: int, gamma: float = 3.0) -> torch.Tensor:
    """Focal loss (Lin et al. 2017) of a two-way domain classifier: the mean over the rows of
    ``-(1 - p_d)^gamma log p_d``, p_d = softmax(logits)[:, d]. HTCN (Chen et al. CVPR 2020) uses it
    with gamma = 3 on its image-level discriminator D3 and instance-level D_ins (the code's
    ``FocalLoss(class_num=2, gamma=3)``, alpha 1, averaged); SWDA's global D with gamma = 5.
    gamma = 0 is the cross-entropy. log p_d is taken from ``log_softmax``, so a confident row is exact.

    Shape: logits [N, 2], domain 0 (source) or 1 (target) -> scalar.
    """
    if logits.dim() != 2 or logits.shape[1] != 2:
        raise ValueError(f"focal_domain_loss takes two-way logits [N, 2], got shape {list(logits.shape)}")
    log_p = logits.float().log_softmax(1)[:, int(domain)]
    return -((1 - log_p.exp()).pow(gamma) * log_p).mean()


def domain_accuracy(logits: torch.Tensor, domain: float) -> torch.Tensor:
    """The fraction of examples (locations) a domain classifier assigns to ``domain``: for a one-logit
    classifier ``logit > 0`` means target; for two-way logits [N, 2] the argmax. Detached, float32.

    Shape: logits [*] (one logit each) or [N, 2] (always read as two-way), domain 0 or 1 -> scalar in [0, 1].
    """
    logits = logits.detach()
    said_target = logits.argmax(1) == 1 if logits.dim() == 2 and logits.shape[1] == 2 else logits > 0
    return (said_target == bool(domain)).float().mean()
