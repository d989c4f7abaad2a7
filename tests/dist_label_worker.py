"""One round of labelling as the engine runs it, in this process or as one of torchrun's processes.

``python tests/dist_label_worker.py {cbst_sp,wst} OUT`` labels a small synthetic target set with a
seeded random model through the task's labeller, predictions and sink, into ``OUT/round_001.h5``,
and writes each process's round record to ``OUT/record-RANK.json``. Under ``torchrun`` the
processes shard the target set; ``SELFTRAIN_TEST_KILL_RANK=r`` makes rank r kill itself (SIGKILL)
after its first selected batch.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import torch

from selftrain import dist
from selftrain.adapters import create_adapter
from selftrain.data.datasets import build_dataset
from selftrain.data.detsets import build_det_dataset
from selftrain.phases import RunData
from selftrain.policies import ThresholdPolicy, create_policy
from selftrain.pseudo import PixelSink, label_round
from selftrain.store import RoundMeta
from selftrain.tasks import DetectionTask, SegmentationTask


def setting(kind: str):
    """(task, model, policy, target set, batch size): 11 street images in 6 batches of 2, or 7 shape
    images in 3 batches of 3, so the shards of two processes differ in size."""
    torch.manual_seed(0)
    if kind == "cbst_sp":
        data = build_dataset("synth_street", root=None, split="target_train", num_classes=10, ignore_index=255,
                             options={"num_images": 11, "height": 32, "width": 64})
        prior = np.random.default_rng(0).dirichlet(np.ones(10), size=(32, 64)).transpose(2, 0, 1)
        policy = ThresholdPolicy(name="cbst_sp", class_balanced=True, num_classes=10, prior=prior)
        model = create_adapter("tiny_seg", num_classes=10, width=8)
        run = RunData(source=data, target=data, target_val=None, num_classes=10,
                      class_names=[f"c{i}" for i in range(10)], pseudo_batch=2)
        return SegmentationTask(run), model, policy, run
    data = build_det_dataset("synth_shapes", root=None, split="target_train",
                             options={"num_images": 7, "height": 64, "width": 64})
    k = len(data.class_names)
    model = create_adapter("tiny_ssd", num_classes=k, width=16)
    run = RunData(source=data, target=data, target_val=None, num_classes=k, class_names=list(data.class_names),
                  pseudo_batch=3)
    return DetectionTask(run), model, create_policy("wst", threshold=0.0), run


class KillAfterFirst(PixelSink):
    def add(self, *args, **kwargs):
        super().add(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)


def main(kind: str, out: Path) -> None:
    dist.init_from_env("cpu")
    task, model, policy, run = setting(kind)
    sink = task.sink
    if os.environ.get("SELFTRAIN_TEST_KILL_RANK") == str(dist.rank()):
        sink = lambda part: KillAfterFirst(part, num_classes=run.num_classes, ignore_index=255)  # noqa: E731
    meta = RoundMeta(task=task.name, round=1, policy=policy.name, portion=0.35, num_classes=run.num_classes,
                     class_names=run.class_names)
    labeller = task.labeller(policy, portion=0.35, progress=1.0, device="cpu")
    record = label_round(labeller, lambda part, scratch: task.predictions(model, part, scratch, device="cpu",
                                                                          offline=policy.offline),
                         sink, dataset=run.target, batch_size=run.pseudo_batch, meta=meta, path=out / "round_001.h5")
    (out / f"record-{dist.rank()}.json").write_text(json.dumps(record.to_dict(), sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
