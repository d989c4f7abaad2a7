"""Every registry entry satisfies its Protocol (selftrain/interfaces.py), and the registries'
metadata says what the builders rely on: the task of each adapter, policy, loss term and data set,
the kind of each policy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selftrain import interfaces as I
from selftrain.adapters import ADAPTERS
from selftrain.callbacks import CallbackBase, ConsoleReport, MetricsWriter, PlotWriter, TensorBoardWriter
from selftrain.data import DATASETS, DET_DATASETS, REGISTRIES
from selftrain.losses import LOSSES
from selftrain.phases import RunData
from selftrain.policies import POLICIES
from selftrain.tasks import build_task
from selftrain.teachers import make_teacher

TASKS = ("segmentation", "detection")
SMALL = {"smp_unet": {"encoder": "resnet18"}, "tiny_seg": {"width": 4}, "tiny_ssd": {"width": 8}}


@pytest.mark.parametrize("reg", [ADAPTERS, POLICIES, LOSSES, DATASETS, DET_DATASETS], ids=lambda r: r.kind)
def test_every_entry_declares_its_tasks(reg):
    for name in reg.names():
        tasks = reg.entry(name).tasks
        assert tasks and set(tasks) <= set(TASKS), (reg.kind, name, tasks)


def test_the_data_set_registries_hold_their_task_only():
    for task, reg in REGISTRIES.items():
        assert reg.names() and reg.names(task=task) == reg.names()
    assert not set(DATASETS.names()) & set(DET_DATASETS.names())


@pytest.mark.parametrize("name", ADAPTERS.names())
def test_every_adapter_satisfies_the_protocol_of_its_task(name):
    entry = ADAPTERS.entry(name)
    adapter = entry.build(num_classes=3, **SMALL.get(name, {}))
    (task,) = entry.tasks
    assert adapter.task == task
    assert isinstance(adapter, I.SegmentationAdapter if task == "segmentation" else I.DetectionAdapter)
    head = adapter.head_parameters()
    assert head is None or {id(p) for p in head} <= {id(p) for p in adapter.parameters()}
    assert all(isinstance(k, str) and c > 0 for k, c in adapter.feature_channels().items())


def _policy(name):
    entry = POLICIES.entry(name)
    run = {"num_classes": 3, "ignore_index": 255}
    kwargs = {k: run[k] for k in entry.meta.get("takes", ())}
    if entry.meta.get("prior"):
        kwargs["prior"] = np.full((3, 8, 8), 1 / 3, dtype=np.float32)
    return entry, entry.build(**kwargs)


@pytest.mark.parametrize("name", POLICIES.names())
def test_every_policy_is_of_the_kind_it_declares(name):
    entry, policy = _policy(name)
    assert entry.meta["kind"] in ("offline", "online")
    if entry.meta["kind"] == "offline":
        assert isinstance(policy, I.OfflinePolicy) and policy.offline is True
    else:
        assert isinstance(policy, I.OnlinePolicy) and policy.offline is False
        assert np.isfinite(float(policy.threshold)) and policy.teacher in ("student", "ema")


@pytest.mark.parametrize("name", POLICIES.names())
def test_the_builder_passes_only_what_a_policy_takes(name):
    entry = POLICIES.entry(name)
    takes = set(entry.meta.get("takes", ()))
    assert takes <= {"num_classes", "ignore_index"}
    if entry.meta["kind"] == "offline":
        assert takes == {"num_classes", "ignore_index"}


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_term_satisfies_the_protocol_and_its_metadata(name):
    term = LOSSES.get(name)()
    assert isinstance(term, I.LossTerm) and term.name == name
    assert set(term.tasks) == set(LOSSES.entry(name).tasks)


@pytest.mark.parametrize("kind", ["student", "ema"])
def test_teachers_satisfy_the_protocol(kind):
    student = ADAPTERS.get("tiny_seg")(num_classes=3, width=4)
    teacher = make_teacher(kind, student)
    assert isinstance(teacher, I.Teacher)
    teacher.update(student, 0)
    teacher.load_state_dict(teacher.state_dict())
    assert teacher.predict(torch.zeros(1, 3, 16, 32)).logits.shape == (1, 3, 16, 32)


@pytest.mark.parametrize("task", TASKS)
def test_tasks_satisfy_the_protocol(task):
    data = RunData(source=[], target=[], target_val=None, num_classes=3, class_names=["a", "b", "c"])
    assert isinstance(build_task(task, data), I.Task)


@pytest.mark.parametrize("cls", [MetricsWriter, PlotWriter, TensorBoardWriter, ConsoleReport, CallbackBase])
def test_callbacks_satisfy_the_protocol(cls):
    assert isinstance(cls.__new__(cls), I.Callback)


def test_a_model_or_data_set_of_the_other_task_is_refused_before_anything_is_built(tiny_recipe, monkeypatch):
    from selftrain.build import build_adapter, build_data
    from selftrain.config import load_recipe
    from selftrain.errors import ConfigError
    from selftrain.registry import Entry

    def never(**_):
        raise AssertionError("built")

    monkeypatch.setitem(ADAPTERS._items, "tiny_ssd", Entry("tiny_ssd", never, {"task": "detection"}))
    with pytest.raises(ConfigError, match="adapter tiny_ssd is a detection model but the recipe's task is segmentation"):
        build_adapter(load_recipe(tiny_recipe, ["model={name: tiny_ssd}"]))
    with pytest.raises(ConfigError, match="data set synth_shapes is a detection data set .* pick one of: .*synth_street"):
        build_data(load_recipe(tiny_recipe, ["data.source={name: synth_shapes, split: source}"]))
