"""Pseudo-label policies behind one registry: ``create_policy("cbst_sp", prior=q)``.

Each entry declares its ``task`` (or tasks) and ``kind``: ``offline`` policies label the whole
target set between rounds (``OfflinePolicy``), ``online`` ones label every target batch as the
model trains (``OnlinePolicy``); ``prior=True`` marks the policies that need a spatial prior and
``takes`` the run's settings (``num_classes``, ``ignore_index``) a policy is built with.
"""

from __future__ import annotations

from typing import Any

from ..registry import Registry
from .online import MeanTeacher, WeakSelfTraining
from .threshold import ThresholdPolicy

POLICIES: Registry[Any] = Registry("policy")


@POLICIES.register("st", task="segmentation", kind="offline", takes=("num_classes", "ignore_index"))
def st(**kwargs: Any) -> ThresholdPolicy:
    """ST: one confidence threshold over all target pixels (CBST Algorithm 1)."""
    return ThresholdPolicy(name="st", class_balanced=False, **kwargs)


@POLICIES.register("cbst", task="segmentation", kind="offline", takes=("num_classes", "ignore_index"))
def cbst(**kwargs: Any) -> ThresholdPolicy:
    """CBST: one threshold per class over the pixels predicted as that class (Algorithm 2)."""
    return ThresholdPolicy(name="cbst", class_balanced=True, **kwargs)


@POLICIES.register("st_sp", task="segmentation", kind="offline", prior=True, takes=("num_classes", "ignore_index"))
def st_sp(*, prior: Any, **kwargs: Any) -> ThresholdPolicy:
    """ST-SP: ST on prior-weighted potentials q * p (CBST appendix, GTA5 -> BDD ablation)."""
    return ThresholdPolicy(name="st_sp", class_balanced=False, prior=prior, **kwargs)


@POLICIES.register("cbst_sp", task="segmentation", kind="offline", prior=True, takes=("num_classes", "ignore_index"))
def cbst_sp(*, prior: Any, **kwargs: Any) -> ThresholdPolicy:
    """CBST-SP: CBST on prior-weighted potentials q * p (§4.4, eq. 8)."""
    return ThresholdPolicy(name="cbst_sp", class_balanced=True, prior=prior, **kwargs)


@POLICIES.register("det_st", task="detection", kind="online")
def det_st(**kwargs: Any) -> WeakSelfTraining:
    """Naive detection self-training: detections with score >= 0.9 are ground truth, hard negatives,
    no box loss (Kim et al. 2019, Table 4 row A: the failing baseline)."""
    return WeakSelfTraining(name="det_st", **{"srrs": False, "negatives": "hard", **kwargs})


@POLICIES.register("wst", task="detection", kind="online")
def wst(**kwargs: Any) -> WeakSelfTraining:
    """Weak self-training: SRRS >= 0.8 selects pseudo-boxes, weak negative mining (Kim et al. 2019, row F)."""
    return WeakSelfTraining(name="wst", **kwargs)


@POLICIES.register("mean_teacher", task=("segmentation", "detection"), kind="online",
                   takes=("ignore_index",))
def mean_teacher(**kwargs: Any) -> MeanTeacher:
    """Mean teacher: an EMA teacher labels weak views, the student learns from strong views."""
    return MeanTeacher(**kwargs)


def create_policy(name: str, **kwargs: Any) -> Any:
    """Build a registered policy by name; an unknown name lists the registered ones."""
    return POLICIES.get(name)(**kwargs)


__all__ = ["POLICIES", "MeanTeacher", "ThresholdPolicy", "WeakSelfTraining", "create_policy"]
