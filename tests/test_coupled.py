"""coupled.py through ``prune()``: ``--coupled-rate`` narrows residual streams, SE gates and
depthwise stacks physically, the output equals the original with the dropped channels' readers
zeroed (checked here independently of the library's verify), calibration keeps the groups'
channels and refits their readers, and what cannot be narrowed is left alone with a reason."""

import numpy as np
import onnx
import pytest

from coupled_graphs import CoupledBuilder
from onnxprune.errors import UserError
from onnxprune.ir.graph import GraphIndex
from onnxprune.pipeline import PruneConfig, prune
from oracle import feeds_for, rel_diff, run


def residual_stream(head="conv", classes=16):
    """stem 3->32, two basic blocks on the 32-wide stream, a stride-2 block with a 1x1 shortcut
    onto a 48-wide stream, then a Conv head (or GAP -> Flatten -> Gemm). The Conv head has 16
    outputs (``classes``): with fewer, --min-channels 16 leaves it dense, and so the 48-wide
    stream it reads."""
    b = CoupledBuilder(size=8)
    x = b.relu(b.conv("input", 32, name="stem"))
    for i in range(2):
        y = b.relu(b.conv(x, 32, name=f"b{i}a"))
        x = b.relu(b.add(b.conv(y, 32, name=f"b{i}b"), x))
    y = b.relu(b.conv(x, 48, stride=2, name="b2a"))
    x = b.relu(b.add(b.conv(y, 48, name="b2b"), b.conv(x, 48, k=1, stride=2, name="b2s")))
    if head == "conv":
        b.output(b.conv(x, classes, k=1, name="head"))
    elif head == "gemm":
        b.output(b.gemm(b.gap_flatten(x), 10))
    else:  # the 4x4 map flattened: channel c is 16 features of the Gemm
        c, h, w = b.shape[x]
        b.output(b.gemm(b.op("Flatten", [x], (c * h * w,), axis=1), 10))
    return b.model()


def se_depthwise():
    """MobileNet-style stream (32) of two expand -> depthwise -> SE -> project blocks; a 16-output
    head (see ``residual_stream``)."""
    b = CoupledBuilder(size=8)
    x = b.relu(b.conv("input", 32, name="stem"))
    for i in range(2):
        y = b.relu(b.conv(x, 64, k=1, name=f"expand{i}"))
        y = b.relu(b.conv(y, 64, group=64, name=f"dw{i}"))
        y = b.se_conv(y, 16)
        x = b.add(b.conv(y, 32, k=1, name=f"project{i}"), x)
    b.output(b.conv(x, 16, k=1, name="head"))
    return b.model()


def zero_dropped_reads(model, plan):
    """The original with, for every Conv of the plan, the grouped kernels it does not keep zeroed
    (coupled readers: the input channels their group drops), computed here from the plan's data."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    index = GraphIndex(out.graph)
    layers = plan.by_node()
    for node in out.graph.node:
        layer = layers.get(node.name)
        if layer is None:
            continue
        weight = index.constant(node.input[1]).copy()
        group_of = np.empty(layer.c_out, dtype=int)
        group_of[layer.filter_order] = np.arange(layer.c_out) // (layer.c_out // layer.groups)
        mask = np.zeros((layer.c_out, layer.c_in), dtype=bool)
        for f in range(layer.c_out):
            mask[f, layer.kept_in_channels[group_of[f]]] = True
        weight[~mask] = 0  # a Gemm head's weight here is [outputs, features] (transB=1)
        for t in out.graph.initializer:
            if t.name == node.input[1]:
                t.CopyFrom(onnx.numpy_helper.from_array(weight, t.name))
    return out


def conv_shapes(model):
    index = GraphIndex(model.graph)
    return {n.name: index.constant(n.input[1]).shape for n in model.graph.node if n.op_type == "Conv"}


@pytest.mark.parametrize("build", [residual_stream, se_depthwise])
def test_coupled_groups_are_removed_and_the_output_is_exact(build):
    model = build()
    pruned, report = prune(model, PruneConfig(coupled_rate=0.5, target_macs=0.6))
    groups = report["coupled"]["groups"]
    assert groups, report["coupled"]["left_alone"]
    assert all(g["width_after"] < g["width_before"] and g["width_after"] % 16 == 0 for g in groups)
    shapes = conv_shapes(pruned)
    if build is residual_stream:
        assert shapes["stem"][0] == 16 and shapes["b0a"][1] == 16 and shapes["b1b"][0] == 16  # the 32-wide stream
        assert shapes["b2b"][0] == shapes["b2s"][0] == shapes["head"][1] < 48  # the 48-wide one
    else:
        assert shapes["stem"][0] == shapes["project1"][0] == shapes["expand0"][1] == 16
    feeds = feeds_for(model)
    reference = run(zero_dropped_reads(model, report.plan), feeds)
    assert rel_diff(reference, run(pruned, feeds)) < 1e-4
    assert report["verify"]["passed"]
    assert report["macs_after"] <= 0.6 * 1.02 * report["macs_before"]
    onnx.checker.check_model(pruned, full_check=True)


def test_coupled_cut_is_deeper_than_single_conv_at_the_same_rate_and_deterministic():
    model = residual_stream()
    plain, plain_report = prune(model, PruneConfig(groups="auto", rate=0.3))
    a, report = prune(model, PruneConfig(groups="auto", rate=0.3, coupled_rate=0.5))
    b, _ = prune(model, PruneConfig(groups="auto", rate=0.3, coupled_rate=0.5))
    assert report["macs_after"] < plain_report["macs_after"]
    assert a.SerializeToString() == b.SerializeToString()


def test_calibration_keeps_the_groups_channels_and_refits_their_readers():
    model = residual_stream()
    rng = np.random.default_rng(0)
    calib = {"input": rng.standard_normal((48, 3, 8, 8)).astype(np.float32)}
    pruned, report = prune(model, PruneConfig(coupled_rate=0.5, target_macs=0.6, calib=calib))
    readers = {name for g in report["coupled"]["groups"] for name in g["consumers"]}
    layers = report.plan.by_node()
    assert readers <= set(layers)
    for name in readers:
        assert layers[name].provenance["channels"].startswith("coupled channel group")
    refit = {entry["name"]: entry for entry in report["calibration"]["layers"]}
    assert all(refit[name]["refit"] for name in readers)
    assert report["verify"]["passed"]


def test_a_gemm_head_reading_the_pooled_stream_is_a_reader_refit_like_a_conv():
    model = residual_stream(head="gemm")
    rng = np.random.default_rng(1)
    calib = {"input": rng.standard_normal((48, 3, 8, 8)).astype(np.float32)}
    pruned, report = prune(model, PruneConfig(coupled_rate=0.5, target_macs=0.7, calib=calib))
    assert [g["width_before"] for g in report["coupled"]["groups"]] == [32, 48]
    gemm = next(n for n in pruned.graph.node if n.op_type == "Gemm")
    assert GraphIndex(pruned.graph).constant(gemm.input[1]).shape[1] == report["coupled"]["groups"][1]["width_after"]
    refit = {entry["name"]: entry for entry in report["calibration"]["layers"]}
    assert refit[gemm.name]["refit"] and refit[gemm.name]["pruned"]
    assert report["verify"]["passed"]
    uncalibrated, report = prune(model, PruneConfig(coupled_rate=0.5, target_macs=0.7))
    feeds = feeds_for(model)
    assert rel_diff(run(zero_dropped_reads(model, report.plan), feeds), run(uncalibrated, feeds)) < 1e-4


def test_a_gemm_reading_a_flattened_map_leaves_the_group_alone_with_the_reason():
    pruned, report = prune(residual_stream(head="flat"), PruneConfig(coupled_rate=0.5, target_macs=0.7))
    left = report["coupled"]["left_alone"]
    assert any("Gemm" in entry["reason"] and entry["width"] == 48 for entry in left), left
    assert [g["width_before"] for g in report["coupled"]["groups"]] == [32]
    assert report["verify"]["passed"]


@pytest.mark.parametrize("options, message", [
    ({"groups": 8}, "--groups auto only"),
    ({"coupled_rate": 1.0}, "--coupled-rate must be in (0, 1)"),
    ({"coupled_rate": 0.0}, "--coupled-rate must be in (0, 1)"),
])
def test_bad_coupled_options_are_user_errors(options, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prune(residual_stream(), PruneConfig(**{"coupled_rate": 0.5, **options}))


def test_with_calibration_data_the_kept_channels_are_those_the_readers_use_most():
    """Independent oracle: score = Σ over the group's readers of ||W[:, c]||² · mean(x_c²) / that
    reader's mean, x the reader's input in the dense model on the calibration inputs."""
    from onnxprune.channels.coupled import CHANNELS_DATA, choose
    from onnxprune.ir.normalize import normalize

    model = normalize(residual_stream())
    rng = np.random.default_rng(3)
    feeds = {"input": rng.standard_normal((16, 3, 8, 8)).astype(np.float32)}
    plan = choose(model, 0.5, 16, feeds=feeds)
    cut = next(c for c in plan.cuts if c.width == 32)
    assert cut.importance == CHANNELS_DATA
    nodes = {n.name: n for n in model.graph.node}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    reads = [nodes[name].input[0] for name in cut.consumers]
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in reads)
    values = dict(zip([o.name for o in probe.graph.output], run(probe, feeds)))
    index = GraphIndex(model.graph)
    score = np.zeros(32)
    for name in cut.consumers:
        w = index.constant(nodes[name].input[1]).astype(np.float64)
        x = values[nodes[name].input[0]].astype(np.float64)
        share = (w ** 2).sum(axis=(0, 2, 3)) * (x ** 2).mean(axis=(0, 2, 3))
        score += share / share.mean()
    assert list(cut.kept) == sorted(np.argsort(-score, kind="stable")[:16].tolist())
    weights_only = next(c for c in choose(model, 0.5, 16).cuts if c.width == 32)
    assert weights_only.kept != cut.kept  # the data changes the choice here


# ----------------------------------------------------------------------------- review findings

def two_blocks(b):
    x = b.relu(b.conv("input", 32, name="stem"))
    for i in range(2):
        y = b.relu(b.conv(x, 32, name=f"b{i}a"))
        x = b.relu(b.add(b.conv(y, 32, name=f"b{i}b"), x))
    return x


def with_symbolic_spatial_dims(model):
    model = onnx.ModelProto.FromString(model.SerializeToString())
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    del model.graph.value_info[:]
    return model


def test_a_tie_that_holds_only_at_the_working_size_is_left_alone():
    """AveragePool(8) -> Flatten -> Gemm ties channel to feature only where the map is 8x8."""
    b = CoupledBuilder(size=8)
    x = two_blocks(b)
    pooled = b.op("AveragePool", [x], (32, 1, 1), kernel_shape=[8, 8])
    b.output(b.gemm(b.op("Flatten", [pooled], (32,), axis=1), 10))
    model = with_symbolic_spatial_dims(b.model())
    _, report = prune(model, PruneConfig(coupled_rate=0.5, target_macs=0.7, input_shapes={"input": [1, 3, 8, 8]}))
    assert any("spatial size" in entry["reason"] for entry in report["coupled"]["left_alone"])
    assert report["verify"]["passed"]


def test_a_gemm_reader_with_a_broadcast_bias_leaves_the_group_alone():
    b = CoupledBuilder(size=8)
    flat = b.gap_flatten(two_blocks(b))
    weight = b._const("fc.weight", b.rng.standard_normal((10, 32)) / 6)
    bias = b._const("fc.bias", b.rng.standard_normal((1, 10)) * 0.1)
    out = b._op("Gemm", [flat, weight, bias], "fc", transB=1)
    b.shape[out] = (10,)
    b.output(out)
    calib = {"input": np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype(np.float32)}
    _, report = prune(b.model(), PruneConfig(coupled_rate=0.5, target_macs=0.8, calib=calib))
    assert any("Gemm" in entry["reason"] for entry in report["coupled"]["left_alone"])
    assert report["verify"]["passed"]


def test_excluding_a_depthwise_conv_inside_a_group_leaves_the_group_alone():
    _, report = prune(se_depthwise(), PruneConfig(coupled_rate=0.5, target_macs=0.8, exclude=("dw0",)))
    assert all("dw0" not in g["members"][0][0] for g in report["coupled"]["groups"])
    assert any("excluded" in entry["reason"] for entry in report["coupled"]["left_alone"])
    assert report["verify"]["passed"]


@pytest.mark.parametrize("rate", [0.5, "auto"])
@pytest.mark.parametrize("with_data", [False, True])
def test_a_coupled_plan_is_replayed_exactly_through_its_json(rate, with_data):
    """--plan-out / --plan-in of a run that narrowed groups: the plan records the groups, and the
    replay rebuilds the same structure; without data, the same model (with --calib the replay's
    calibration chooses kept kernels from the data again, as for any replayed plan)."""
    from onnxprune.planning.plan import Plan

    calib = {"input": np.random.default_rng(3).standard_normal((48, 3, 8, 8)).astype(np.float32)}
    options = {"calib": calib} if with_data else {}
    target = 0.4 if rate == "auto" and with_data else 0.6  # where the measured costs take a group
    first, report = prune(residual_stream(), PruneConfig(coupled_rate=rate, target_macs=target, **options))
    assert report["coupled"]["groups"] and report.plan.coupled
    plan = Plan.from_json(report.plan.to_json())
    assert plan.coupled == report.plan.coupled
    again, replayed = prune(residual_stream(), PruneConfig(plan=plan, **options))
    assert replayed["verify"]["passed"] and replayed["macs_after"] == report["macs_after"]
    assert [g["width_after"] for g in replayed["coupled"]["groups"]] == [g["width_after"] for g in
                                                                           report["coupled"]["groups"]]
    if not with_data:
        feeds = feeds_for(residual_stream())
        assert rel_diff(run(first, feeds), run(again, feeds)) < 1e-6


def test_a_plan_saved_before_plans_recorded_groups_is_refused_and_says_what_to_do():
    _, report = prune(residual_stream(), PruneConfig(target_macs=0.6))
    from dataclasses import replace

    old = replace(report.plan, coupled=[])  # what version 2 wrote
    with pytest.raises(UserError, match="saved before plans recorded them.*--coupled-rate off"):
        prune(residual_stream(), PruneConfig(plan=old))


def test_an_inconsistent_coupled_plan_is_refused_not_rewritten_wrong():
    """Edited plans whose reader layers disagree with the recorded groups would rewrite a model
    that is not the plan's (silently with --no-verify): refused with one line."""
    from dataclasses import replace

    from onnxprune.planning.plan import Plan

    _, report = prune(residual_stream(), PruneConfig(target_macs=0.6))
    plan, record = report.plan, report.plan.coupled[0]
    reader = report["coupled"]["groups"][0]["consumers"][0]
    no_reader = replace(plan, layers=[layer for layer in plan.layers if layer.node != reader])
    other_kept = replace(plan, coupled=[{**record, "kept": [c for c in range(record["width"])
                                                            if c not in record["kept"]][:len(record["kept"])]}])
    for bad in (no_reader, other_kept):
        with pytest.raises(UserError, match="inconsistent"):
            prune(residual_stream(), PruneConfig(plan=bad, verify=False))
    with pytest.raises(UserError, match="twice"):
        Plan.from_json(replace(plan, coupled=[record, record]).to_json())


def test_off_and_fixed_rates_through_the_python_api():
    _, off = prune(residual_stream(), PruneConfig(target_macs=0.6, coupled_rate="off"))
    assert off["coupled"] is None
    _, fixed = prune(residual_stream(), PruneConfig(target_macs=0.6, coupled_rate=0.5))
    assert "couple" in fixed["timings_s"]


def test_a_recorded_group_the_model_does_not_have_is_a_user_error():
    from dataclasses import replace

    _, report = prune(residual_stream(), PruneConfig(target_macs=0.6))
    bad = [{**report.plan.coupled[0], "members": [["no_such_tensor", 0]]}]
    with pytest.raises(UserError, match="not one this model can narrow"):
        prune(residual_stream(), PruneConfig(plan=replace(report.plan, coupled=bad)))


def test_target_speedup_is_refused_and_an_overshooting_cut_says_so():
    with pytest.raises(UserError, match="--target-speedup"):
        prune(residual_stream(), PruneConfig(coupled_rate=0.5, target_speedup=1.3))
    _, report = prune(residual_stream(), PruneConfig(coupled_rate=0.5, target_macs=0.95))
    assert any("no single-Conv cut is added" in note for note in report["coupled"]["notes"])
    assert report["convs_pruned"] == len({n for g in report["coupled"]["groups"] for n in g["consumers"]})


def test_with_calibration_and_no_target_the_budget_is_not_searched():
    calib = {"input": np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype(np.float32)}
    _, report = prune(residual_stream(), PruneConfig(coupled_rate=0.5, calib=calib))
    assert report["budget"] is None and report["coupled"]["groups"]


def test_readers_are_not_also_listed_as_skipped():
    _, report = prune(residual_stream(), PruneConfig(coupled_rate=0.5, target_macs=0.6))
    readers = {n for g in report["coupled"]["groups"] for n in g["consumers"]}
    assert not readers & {entry["node"] for entry in report.plan.skipped}


def test_a_tensor_holding_the_group_twice_scores_both_copies():
    """Concat([x, x]) -> head: boosting the head's weights on the FIRST copy of channels 0..7
    must keep them (the second copy was the only one scored before)."""
    from onnxprune.channels.coupled import choose
    from onnxprune.ir.normalize import normalize

    b = CoupledBuilder(size=8)
    x = two_blocks(b)
    b.output(b.conv(b.concat([x, x]), 10, k=1, name="head"))
    model = normalize(b.model())
    for tensor in model.graph.initializer:
        if tensor.name == "head.weight":
            w = onnx.numpy_helper.to_array(tensor).copy()
            w[:, :8] *= 1000
            tensor.CopyFrom(onnx.numpy_helper.from_array(w, tensor.name))
    cut = next(c for c in choose(model, 0.5, 16).cuts if c.width == 32)
    assert set(range(8)) <= set(cut.kept)


def test_a_one_to_one_group_through_a_concat_is_narrowed_not_called_private():
    b = CoupledBuilder(size=8)
    x = two_blocks(b)
    side = b.relu(b.conv(x, 32, name="side"))
    b.output(b.conv(b.concat([x, side]), 16, k=1, name="head"))
    _, report = prune(b.model(), PruneConfig(coupled_rate=0.5, target_macs=0.6))
    assert any(g["producers"] == ["side"] for g in report["coupled"]["groups"])
    assert report["verify"]["passed"]


def test_a_model_that_cannot_run_at_the_calibration_batch_is_refused_before_planning(tmp_path, capsys):
    """spatial_ops hard-codes the batch (2) in a Resize's sizes: calibration's batches fail in
    ORT. That is the input's problem, said in one line before planning (exit 2), not an internal
    error after minutes of work."""
    from coupled_graphs import spatial_ops

    from onnxprune.cli import main

    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    src.write_bytes(spatial_ops().SerializeToString())
    np.savez(tmp_path / "calib.npz", input=np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype(np.float32))
    assert main([str(src), str(out), "--calib", str(tmp_path / "calib.npz"), "--min-channels", "1"]) == 2
    err = capsys.readouterr().err
    assert "cannot run the input model on the --calib inputs" in err and "internal error" not in err
    assert "planning" not in err and "measuring" not in err and not out.exists()
