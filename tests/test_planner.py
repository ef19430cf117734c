"""Planner wiring: ticket snapshots, criterion choice, per-layer plans."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from graphs import resnet_basic
from onnxprune.errors import UserError
from onnxprune.pipeline import PruneConfig, prune


def _snapshot(model, seed, rename=False):
    """The same architecture with other weights, as an earlier training epoch would be."""
    rng = np.random.default_rng(seed)
    snap = onnx.ModelProto()
    snap.CopyFrom(model)
    renames = {}
    for init in snap.graph.initializer:
        value = numpy_helper.to_array(init)
        if value.ndim == 4:
            new = value * rng.uniform(0.3, 1.0, size=value.shape).astype(np.float32)
            name = f"snap_{init.name}" if rename else init.name
            renames[init.name] = name
            init.CopyFrom(numpy_helper.from_array(new, name))
    for node in snap.graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = renames.get(name, name)
    return snap


def test_tickets_switch_the_criterion_to_tmi():
    model = resnet_basic().model()
    _, with_tickets = prune(model, PruneConfig(groups=4, tickets=[_snapshot(model, 1), _snapshot(model, 2)]))
    _, without = prune(model, PruneConfig(groups=4))
    assert {layer.criterion for layer in with_tickets.plan.layers} == {"tmi"}
    assert {layer.criterion for layer in without.plan.layers} == {"magnitude"}
    for layer in with_tickets.plan.layers:
        assert layer.clustering_method in ("kpca", "spectral", "density")
        assert len(layer.scores["round_winners"]) == 2


def test_tickets_matched_by_conv_order_when_names_differ():
    model = resnet_basic().model()
    _, report = prune(model, PruneConfig(groups=4, tickets=[_snapshot(model, 1, rename=True)]))
    assert {layer.criterion for layer in report.plan.layers} == {"tmi"}


def test_magnitude_criterion_ignores_tickets():
    model = resnet_basic().model()
    _, report = prune(model, PruneConfig(groups=4, criterion="magnitude", tickets=[_snapshot(model, 1)]))
    assert {layer.criterion for layer in report.plan.layers} == {"magnitude"}


def test_ticket_from_another_architecture_is_a_user_error():
    from graphs import vgg

    with pytest.raises(UserError, match="snapshot"):
        prune(resnet_basic().model(), PruneConfig(groups=4, tickets=[vgg().model()]))


def test_plan_layers_have_equal_groups_and_kept_counts():
    _, report = prune(resnet_basic().model(), PruneConfig(groups=4, rate=0.5))
    for layer in report.plan.layers:
        per_group = layer.c_out // layer.groups
        assert sorted(layer.filter_order) == list(range(layer.c_out))
        groups = layer.group_of_filter()
        assert np.bincount(groups).tolist() == [per_group] * layer.groups
        assert {len(k) for k in layer.kept_in_channels} == {layer.c_in // 2}


def test_parallel_planning_gives_the_same_plan(monkeypatch):
    from onnxprune.gkp import planner

    model = resnet_basic().model()
    _, sequential = prune(model, PruneConfig(groups=4))
    monkeypatch.setattr(planner, "PARALLEL_MIN_WEIGHTS", 0)
    monkeypatch.setattr(planner.os, "cpu_count", lambda: 2)
    _, parallel = prune(model, PruneConfig(groups=4))
    assert parallel.plan.to_json() == sequential.plan.to_json()
