"""Calibration-data recovery: refit never hurts, the result still verifies exactly, rate 0 keeps
outputs, and the CLI takes calibration data end to end."""

import copy
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from graphs import FAMILIES, resnet_basic
from onnxprune.ir.analysis import find_prunable_convs
from onnxprune.calibration.calibrate import calibrate, ordered_layers, residual_partners
from onnxprune.calibration.least_squares import ConvGeometry, im2col
from onnxprune.cli import main
from onnxprune.ir.normalize import normalize
from onnxprune.planning.plan import LayerPlan, Plan
from onnxprune.rewriting.rewrite import apply_plan
from onnxprune.checks.verify import session, verify


def hand_plan(model, groups=4, keep=0.5, seed=0):
    """A random but valid plan: shuffled filter groups, random kept channels per group."""
    rng = np.random.default_rng(seed)
    prunable, _ = find_prunable_convs(model, lambda info: groups, 16)
    layers = []
    for info in prunable:
        n = max(1, int(keep * info.c_in))
        kept = [sorted(int(c) for c in rng.choice(info.c_in, n, replace=False)) for _ in range(groups)]
        layers.append(LayerPlan(info.name, info.weight, info.c_out, info.c_in, list(info.kernel), groups,
                                [int(i) for i in rng.permutation(info.c_out)], kept))
    return Plan(layers)


def inputs(n=48, seed=1, channels=3, size=16):
    rng = np.random.default_rng(seed)
    return {"input": np.abs(rng.standard_normal((n, channels, size, size))).astype(np.float32)}


@pytest.mark.parametrize("selection", ["weights", "data"])
@pytest.mark.parametrize("family", ["vgg", "resnet_basic", "bottleneck", "fan_out", "concat"])
def test_refit_never_increases_layer_error_and_verifies(family, selection):
    model = normalize(FAMILIES[family]().model())
    plan = hand_plan(model)
    planned = [[list(k) for k in layer.kept_in_channels] for layer in plan.layers]
    config = SimpleNamespace(calib=inputs(), calib_size=None, calib_selection=selection)
    result = calibrate(model, plan, config)
    work, report = result.model, result.report
    assert [layer.kept_in_channels for layer in plan.layers] == planned  # the input plan is not edited
    if selection == "weights":
        assert result.plan is plan
    plan = result.plan
    for layer, before in zip(plan.layers, planned):
        layer.validate()  # still sorted, distinct, same count per group
        assert layer.kept_per_group == len(before[0])
    layers = [e for e in report["layers"] if e["refit"] and e["pruned"]]
    assert len(layers) == len(plan.layers)
    for entry in layers:
        assert entry["rel_mse_refit"] <= entry["rel_mse_pruned"] + 1e-9, entry
    assert sum(e["rel_mse_refit"] for e in layers) < 0.7 * sum(e["rel_mse_pruned"] for e in layers)
    fid = report["fidelity"]
    assert fid["calibrated"]["rel_mse"] < fid["uncalibrated"]["rel_mse"]
    # pruned kernels are exactly zero, weight names unchanged, the rewrite is exact
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in work.graph.initializer}
    for layer in plan.layers:
        assert np.all(weights[layer.weight][~layer.kernel_mask()] == 0)
    result = verify(work, apply_plan(work, plan), plan, tolerance=1e-4)
    assert result.passed, result


def test_calibration_returns_its_decisions_and_leaves_the_input_plan_alone():
    """calibrate() never edits the plan it is given: the kept channels the data chose come back
    in a new Plan, as new LayerPlans with the provenance of that choice (unchanged layers shared),
    and the refit model follows the returned plan."""
    model = normalize(FAMILIES["vgg"]().model())
    plan = hand_plan(model)
    before = copy.deepcopy(plan)
    result = calibrate(model, plan, SimpleNamespace(calib=inputs(), calib_size=None, calib_selection="data"))
    assert plan == before and plan.to_json() == before.to_json()
    changed = {e["name"] for e in result.report["layers"] if e.get("data_selected_groups")}
    assert changed  # the data chose other channels somewhere, else this test would show nothing
    assert result.plan is not plan and result.plan != plan
    decided = result.plan.by_node()
    assert list(decided) == [layer.node for layer in plan.layers]
    for layer in plan.layers:
        new = decided[layer.node]
        if layer.node in changed:
            assert new is not layer and new.kept_in_channels != layer.kept_in_channels
            assert new.provenance["channels"].startswith("calibration: data-aware greedy selection")
            new.validate()
        else:
            assert new is layer
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    for layer in result.plan.layers:
        assert np.all(weights[layer.weight][~layer.kernel_mask()] == 0)
    assert verify(result.model, apply_plan(result.model, result.plan), result.plan, tolerance=1e-4).passed


def test_data_selection_is_never_worse_than_the_plans_choice():
    model = normalize(FAMILIES["resnet_basic"]().model())
    errors = {}
    for selection in ("weights", "data"):
        config = SimpleNamespace(calib=inputs(), calib_size=None, calib_selection=selection)
        report = calibrate(model, hand_plan(model), config).report
        errors[selection] = [e["rel_mse_refit"] for e in report["layers"]]
    # layer 1 sees the same input either way, so its error can only go down
    assert errors["data"][0] <= errors["weights"][0] + 1e-9
    assert sum(errors["data"]) < sum(errors["weights"])


def test_layer_error_matches_direct_measurement():
    """The moments-based error equals the error measured on the refit model's activations."""
    model = normalize(FAMILIES["vgg"]().model())
    plan = hand_plan(model)
    feeds = inputs(n=8)  # too few to hold out: all samples fit
    result = calibrate(model, plan, SimpleNamespace(calib=feeds, calib_size=None))
    work, report = result.model, result.report
    first = result.plan.layers[0]
    node = next(n for n in model.graph.node if n.name == first.node)
    probe = onnx.ModelProto()
    out = []
    for m in (model, work):
        probe.CopyFrom(m)
        probe.graph.output.append(onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None))
        out.append(session(probe).run([node.output[0]], feeds)[0].astype(np.float64))
    direct = np.sum((out[1] - out[0]) ** 2) / np.sum(out[0] ** 2)
    assert report["layers"][0]["rel_mse_refit"] == pytest.approx(direct, rel=1e-3, abs=1e-6)


def test_rate_zero_keeps_outputs():
    model = normalize(resnet_basic().model())
    plan = hand_plan(model, keep=1.0)
    feeds = inputs()
    result = calibrate(model, plan, SimpleNamespace(calib=feeds, calib_size=None))
    work, report = result.model, result.report
    ref, got = session(model).run(None, feeds)[0], session(work).run(None, feeds)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
    assert report["fidelity"]["calibrated"]["top1_agreement"] == 1.0


def test_conv_without_bias_gets_one_and_geometry_is_honoured():
    """Stride 2, no bias (BN kept out): the refit adds a bias and im2col matches ORT's Conv."""
    model = normalize(resnet_basic(bn=False).model())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 9, 9)).astype(np.float32)
    w = rng.standard_normal((4, 5, 3, 3)).astype(np.float32)
    for pads, strides, dil in (([1, 1, 1, 1], [2, 2], [1, 1]), ([0, 1, 2, 0], [1, 2], [2, 1])):
        node = onnx.helper.make_node("Conv", ["x", "w"], ["y"], pads=pads, strides=strides, dilations=dil)
        graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", 1, x.shape)],
                                       [onnx.helper.make_tensor_value_info("y", 1, None)],
                                       [onnx.numpy_helper.from_array(w, "w")])
        conv = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
        ref = session(conv).run(None, {"x": x})[0]
        cols = im2col(x, ConvGeometry.of(node, (3, 3), x.shape[2:]))
        got = (cols @ w.reshape(4, -1).T).reshape(ref.shape[0], ref.shape[2], ref.shape[3], 4).transpose(0, 3, 1, 2)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    # a pruned Conv without a bias input gets one, named after the node
    plan = hand_plan(model)
    node = next(n for n in model.graph.node if n.name == plan.layers[0].node)
    del node.input[2:]
    before = model.SerializeToString()
    result = calibrate(model, plan, SimpleNamespace(calib=inputs(), calib_size=None))
    work, plan = result.model, result.plan
    assert model.SerializeToString() == before  # the caller's model is not modified
    conv = next(n for n in work.graph.node if n.name == node.name)
    assert len(conv.input) == 3 and conv.input[2].startswith(f"{node.name}.bias")
    assert verify(work, apply_plan(work, plan), plan, tolerance=1e-4).passed


def test_deterministic():
    model = normalize(resnet_basic().model())
    a = calibrate(model, hand_plan(model), SimpleNamespace(calib=inputs(), calib_size=None))
    b = calibrate(model, hand_plan(model), SimpleNamespace(calib=inputs(), calib_size=None))
    assert a.model.SerializeToString(deterministic=True) == b.model.SerializeToString(deterministic=True)
    assert a.report["layers"] == b.report["layers"] and a.plan.to_json() == b.plan.to_json()


def test_cli_with_calibration(tmp_path):
    path, out, data_path = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "calib.npy"
    onnx.save(resnet_basic().model(), path)
    np.save(data_path, inputs(n=32)["input"])
    report = tmp_path / "r.json"
    assert main([str(path), str(out), "--groups", "4", "--calib", str(data_path), "--calib-size", "24",
                 "--report", str(report), "-q"]) == 0
    import json
    data = json.loads(report.read_text())
    cal = data["calibration"]
    assert cal["samples"] == 24 and cal["fit_samples"] == 21 and cal["held_out_samples"] == 3
    assert data["verify"]["passed"]
    assert main([str(path), str(out), "--groups", "4", "--calib", str(data_path), "--calib-selection", "weights",
                 "--report", str(report), "-q"]) == 0
    layers = json.loads(report.read_text())["calibration"]["layers"]
    assert layers and all(entry["selection"] == "weight-only (plan)" for entry in layers)


def _probe(model, names, feeds):
    """Values of intermediate tensors ``names`` of ``model`` on ``feeds``."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in names:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return [v.astype(np.float64) for v in session(probe).run(list(names), feeds)]


def test_residual_partners_are_the_skip_operands_computed_before_the_conv():
    model = normalize(resnet_basic().model())
    plan = hand_plan(model)
    partners = residual_partners(model, ordered_layers(model, plan))
    adds = [n for n in model.graph.node if n.op_type == "Add"]
    producer = {o: n for n in model.graph.node for o in n.output}
    # block 1: conv2 + identity (the stem's output); block 2: conv2 comes before the 1x1 shortcut,
    # so the shortcut Conv is the one fit to the sum, with conv2's output as its partner
    block1_conv2 = producer[adds[0].input[0]].name
    shortcut = producer[adds[1].input[1]].name
    assert partners == {block1_conv2: adds[0].input[1], shortcut: adds[1].input[0]}


def test_residual_target_fits_the_sum_the_network_sees():
    """Fit to the Add's output, the shortcut Conv cancels the error conv2 left in the sum."""
    model = normalize(resnet_basic().model())
    feeds = inputs()
    fit = {k: v[:len(v) - len(v) // 8] for k, v in feeds.items()}  # what calibrate() fits on
    add = [n for n in model.graph.node if n.op_type == "Add"][1]
    (reference,) = _probe(model, [add.output[0]], fit)
    errors, reports = {}, {}
    for target in ("output", "residual"):
        config = SimpleNamespace(calib=feeds, calib_size=None, calib_selection="weights", calib_ridge=1e-9,
                                 calib_target=target, calib_layers="pruned")
        result = calibrate(model, hand_plan(model), config)
        work, reports[target] = result.model, result.report
        (got,) = _probe(work, [add.output[0]], fit)
        errors[target] = np.sum((got - reference) ** 2)
    # the shortcut's input is the same in both runs and its refit minimises exactly this error
    # (up to a 1e-9 ridge) when fit to the sum, so it can only be lower
    assert errors["residual"] < errors["output"], errors
    targets = {e["name"]: e["target"] for e in reports["residual"]["layers"]}
    assert sum(t.startswith("output + residual") for t in targets.values()) == 2


def test_dense_layers_after_pruned_ones_are_refit_and_left_unpruned():
    model = normalize(resnet_basic().model())
    plan = hand_plan(model)
    left_dense = plan.layers[2].node  # block 2's first Conv: reads a pruned block's output
    plan.layers = [layer for layer in plan.layers if layer.node != left_dense]
    config = SimpleNamespace(calib=inputs(), calib_size=None, calib_layers="all")
    result = calibrate(model, plan, config)
    work, report, plan = result.model, result.report, result.plan
    entries = {e["name"]: e for e in report["layers"]}
    gemm = next(n.name for n in model.graph.node if n.op_type == "Gemm")
    for name in (left_dense, gemm):
        assert entries[name]["refit"] and not entries[name]["pruned"], entries[name]
        assert entries[name]["rel_mse_refit"] < entries[name]["rel_mse_pruned"], entries[name]
    assert plan.by_node().keys().isdisjoint({left_dense, gemm})
    before = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: onnx.numpy_helper.to_array(t) for t in work.graph.initializer}
    weight = next(n.input[1] for n in model.graph.node if n.name == left_dense)
    assert after[weight].shape == before[weight].shape and np.all(after[weight] != 0)
    assert not np.allclose(after[weight], before[weight])
    rewritten = apply_plan(work, plan)
    conv = next(n for n in rewritten.graph.node if n.name == left_dense)
    assert all(a.i == 1 for a in conv.attribute if a.name == "group")
    assert verify(work, rewritten, plan, tolerance=1e-4).passed
    # with only the pruned layers refit, neither is touched
    config.calib_layers = "pruned"
    report = calibrate(model, plan, config).report
    assert {e["name"] for e in report["layers"]} == set(plan.by_node())


def test_disjoint_groups_keep_their_partition_under_data_selection():
    """A disjoint layer (every input channel in exactly one group) needs no Gather; data-aware
    selection must not make two groups share a channel."""
    model = normalize(FAMILIES["vgg"]().model())
    plan = hand_plan(model)
    rng = np.random.default_rng(3)
    layer = plan.layers[1]
    channels = rng.permutation(layer.c_in)
    per = layer.c_in // layer.groups
    layer = replace(layer, kept_in_channels=[sorted(int(c) for c in channels[g * per:(g + 1) * per])
                                             for g in range(layer.groups)])
    plan.layers[1] = layer
    disjoint = [list(k) for k in layer.kept_in_channels]
    config = SimpleNamespace(calib=inputs(), calib_size=None, calib_selection="data")
    result = calibrate(model, plan, config)
    work, report, plan = result.model, result.report, result.plan
    assert plan.layers[1].kept_in_channels == disjoint
    entry = next(e for e in report["layers"] if e["name"] == layer.node)
    assert entry["selection"] == "weight-only (plan)" and entry["rel_mse_refit"] < entry["rel_mse_pruned"]
    assert sum(e.get("data_selected_groups", 0) for e in report["layers"]) > 0  # the others still choose
    assert verify(work, apply_plan(work, plan), plan, tolerance=1e-4).passed


def test_ridge_is_validated_on_held_out_inputs(monkeypatch):
    """Where the target is the original layer plus per-input noise the kept columns cannot
    explain, the least-squares refit of a wide layer from few inputs fits the noise, however many
    (correlated) rows each input has: 120 inputs × 49 positions are 61 rows per unknown here. The
    ridge is chosen on held-out *inputs*, so it moves towards the original kernels and the refit
    generalises better than one with the fixed default ridge."""
    import onnxprune.calibration.calibrate as calibrate_module
    import onnxprune.calibration.least_squares as least_squares

    rng = np.random.default_rng(0)
    c_in, c_out, n = 96, 4, 120
    w0 = rng.standard_normal((c_out, c_in, 1, 1)).astype(np.float32)
    layer = LayerPlan("conv", "w", c_out, c_in, [1, 1], 1, list(range(c_out)), [list(range(c_in))])
    geo = ConvGeometry((1, 1), (1, 1), (1, 1), (0, 0, 0, 0))

    def data(seed):
        r = np.random.default_rng(seed)
        x = r.standard_normal((n, c_in, 1, 1)) + 0.1 * r.standard_normal((n, c_in, 7, 7))
        y = np.einsum("oi,nihw->nohw", w0[:, :, 0, 0], x) + 3.0 * r.standard_normal((n, c_out, 1, 1))
        return x.astype(np.float32), y.astype(np.float32)

    def held_out_error(weight, bias):
        x, y = data(2)
        pred = np.einsum("oi,nihw->nohw", weight[:, :, 0, 0], x) + bias[:, None, None]
        return float(np.sum((pred - y) ** 2))

    x, y = data(1)
    bias = np.zeros(c_out, np.float32)
    w_val, b_val, entry, _ = calibrate_module.refit_weights(layer, w0, bias, x, y, geo, least_squares.DEFAULT_RIDGE,
                                                         False)
    assert entry["validated"] and entry["ridge"] >= 100 * least_squares.DEFAULT_RIDGE
    monkeypatch.setattr(least_squares, "RIDGE_GRID", (1.0,))
    w_fix, b_fix, fixed, _ = calibrate_module.refit_weights(layer, w0, bias, x, y, geo, least_squares.DEFAULT_RIDGE,
                                                         False)
    assert fixed["ridge"] == least_squares.DEFAULT_RIDGE
    assert held_out_error(w_val, b_val) < 0.9 * held_out_error(w_fix, b_fix)


def test_a_cached_tensor_without_one_row_per_input_is_a_clear_refusal():
    """A later segment reads a tensor computed from weights only (an LSTM's sliced bias, say):
    calibration caches tensors per input row and cannot carry it, so it says so (was: a numpy
    broadcast error as an internal error)."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxprune.calibration.calib_stream import Stream
    from onnxprune.errors import UserError

    bias = numpy_helper.from_array(np.arange(4, dtype=np.float32), "b")
    nodes = [helper.make_node("Identity", ["b"], ["computed"]),
             helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Add", ["r", "computed"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    stream = Stream(model, {"x": np.ones((8, 4), np.float32)}, 8)
    stream.advance(1)  # produced, not cached: only a reader makes it a problem
    with pytest.raises(UserError, match="tensor 'computed' \\(shape \\[4\\] for a batch of 8 inputs\\) is read"):
        stream.advance(3, keep=("y",))


def test_a_tensor_without_rows_that_no_later_segment_reads_is_no_problem():
    """Shape(input) read in the same segment: calibration never feeds it, so it runs as before."""
    from onnx import TensorProto, helper

    from onnxprune.calibration.calib_stream import Stream

    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Reshape", ["r", "s"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    stream = Stream(model, {"x": np.ones((8, 4), np.float32)}, 8)
    stream.advance(1)  # "s" (shape [2]) is produced here and read by the Reshape later: refused then
    assert "s" not in stream.cache and "s" in stream.unreadable
    fresh = Stream(model, {"x": np.ones((8, 4), np.float32)}, 8)
    assert fresh.advance(3, keep=("y",))["y"].shape == (8, 4)  # one segment: nothing to carry
