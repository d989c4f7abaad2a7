"""Every registered policy: observe / fit / select shapes, thresholds in (0, 1], state round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selftrain.policies import POLICIES, create_policy
from selftrain.types import SegPrediction


def make(name: str):
    prior = np.full((4, 8, 8), 1 / 64, dtype=np.float32)
    return create_policy(name, prior=prior) if name.endswith("_sp") else create_policy(name)


OFFLINE = [name for name in POLICIES.names() if getattr(make(name), "offline", True)]


def test_offline_policies_are_the_cbst_family():
    assert OFFLINE == ["cbst", "cbst_sp", "st", "st_sp"]


@pytest.mark.parametrize("name", OFFLINE)
@pytest.mark.parametrize("as_logits", [False, True])
def test_policy_contract(name, as_logits):
    logits = torch.randn(3, 4, 8, 8) * 3
    pred = SegPrediction(logits=logits) if as_logits else torch.softmax(logits, 1)
    pol = make(name)
    pol.reset()
    pol.observe(pred)
    thr = pol.fit(0.3)
    assert thr.shape == (4,) and torch.all((thr > 0) & (thr <= 1))
    labels = pol.select(pred)
    assert labels.dtype == torch.int64 and labels.shape == (3, 8, 8)
    assert set(labels.unique().tolist()) <= {0, 1, 2, 3, 255}
    assert 0 < (labels != 255).float().mean() < 1
    clone = make(name)
    clone.load_state_dict(pol.state_dict())
    assert torch.equal(clone.select(pred), labels)
    pol.reset()
    with pytest.raises(RuntimeError):
        pol.fit(0.3)
