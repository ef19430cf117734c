"""prune_channel_groups: the pruned model computes what the masked model computes.

Two references: ``masked_model`` (a 0/1 mask where consumers read), and, independently of it,
the original model with the consumers' weight slices for dropped channels set to zero
(``zeroed_consumers``, written here from the node types alone).
"""

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

import coupled_graphs as cg
from graphs import FAMILIES
from onnxprune.channels.channel_groups import channel_groups
from onnxprune.ir.graph import GraphIndex, get_attr
from onnxprune.channels.prune_groups import masked_model, prune_channel_groups
from onnxprune.checks.runtime import create_session
from onnxprune.checks.verify import compare_outputs

TOLERANCE = 1e-4


def run(model, x):
    return create_session(model, threads=1, load_error=None).run(None, {"input": x})


def inputs(seed=0):
    return np.random.default_rng(seed).standard_normal((2, 3, 8, 8)).astype(np.float32)


def random_keep(analysis, seed):
    """Per prunable group a random non-empty proper subset (every group loses a channel, so
    every rule is exercised; keeping a group whole is the property test's business)."""
    rng = np.random.default_rng(seed)
    keep = {}
    for group in analysis.groups:
        if group.prunable and group.width > 1:
            size = int(rng.integers(1, group.width))
            keep[group.id] = sorted(rng.choice(group.width, size=size, replace=False).tolist())
    return keep


def zeroed_consumers(model, analysis, keep):
    """The original model with W[:, c] = 0 (Conv), W[c] = 0 (ConvTranspose), the rows of a Gemm /
    MatMul weight (H·W of them per channel after a flatten) for every dropped channel c."""
    kept = analysis.kept_channels(keep)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    index = GraphIndex(out.graph)
    for node in out.graph.node:
        source, block = analysis.hidden.get(node.input[0], (node.input[0], 1)) if node.input else ("", 1)
        if source not in kept or node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        if get_attr(node, "group", 1) != 1:
            continue  # depthwise: carries channels on, reads none of the others
        weight = index.constant(node.input[1]).copy()
        dropped = np.setdiff1d(np.arange(analysis.widths[source]), kept[source])
        rows = (dropped[:, None] * block + np.arange(block)).reshape(-1)
        axis = {"Conv": 1, "ConvTranspose": 0, "Gemm": 1 if get_attr(node, "transB", 0) else 0, "MatMul": 0}
        np.moveaxis(weight, axis[node.op_type], 0)[rows] = 0
        name = f"{node.input[1]}__zeroed_{node.name}"
        out.graph.initializer.append(numpy_helper.from_array(weight, name))
        node.input[1] = name
    return out


def widths(model):
    """Channel count of every Conv/ConvTranspose/Gemm weight, by node."""
    index = GraphIndex(model.graph)
    return {n.name: index.constant(n.input[1]).shape for n in model.graph.node
            if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", sorted(cg.PATTERNS))
def test_pruned_equals_masked_and_zeroed_consumers(name, seed):
    model = onnx.shape_inference.infer_shapes(cg.PATTERNS[name]())  # value_info that pruning must drop
    before = model.SerializeToString()
    analysis = channel_groups(model)
    keep = random_keep(analysis, seed)
    assert keep, "every pattern has a prunable group"
    pruned = prune_channel_groups(model, keep, analysis)
    assert model.SerializeToString() == before
    onnx.checker.check_model(pruned, full_check=True)
    x = inputs(seed)
    original, got = run(model, x), run(pruned, x)
    assert [o.shape for o in got] == [o.shape for o in original]
    for reference in (masked_model(model, keep, analysis), zeroed_consumers(model, analysis, keep)):
        onnx.checker.check_model(reference, full_check=True)
        assert compare_outputs(run(reference, x), got)[1] <= TOLERANCE
    assert compare_outputs(original, got)[1] > 1e-3  # the keep sets did change the function
    assert widths(pruned) != widths(model)


@pytest.mark.parametrize("name", sorted(FAMILIES) + ["reduce_mean_head_opset18"])
def test_existing_families_prune_exactly(name):
    """The core's graph families (BN left in place, GAP -> Flatten -> Gemm, ReduceMean ->
    Reshape -> Gemm; at opset 18 ReduceMean's axes are an input)."""
    build = FAMILIES[name.replace("_opset18", "")]
    model = build(opset=18).model() if name.endswith("opset18") else build().model()
    analysis = channel_groups(model)
    keep = random_keep(analysis, 0)
    pruned = prune_channel_groups(model, keep, analysis)
    onnx.checker.check_model(pruned, full_check=True)
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    got = run(pruned, x)
    assert compare_outputs(run(masked_model(model, keep, analysis), x), got)[1] <= TOLERANCE
    assert compare_outputs(run(zeroed_consumers(model, analysis, keep), x), got)[1] <= TOLERANCE
    assert [o.shape for o in got] == [o.shape for o in run(model, x)]


def test_masked_model_masks_at_reads_not_after_producers():
    """A BN shift after the producer turns a zeroed channel into a constant; the mask must sit
    where the consumer reads, or the masked model would disagree with the pruned one."""
    model = cg.densenet()  # grow convs -> BN -> Relu -> Concat -> readers
    analysis = channel_groups(model)
    grow0 = next(g for g in analysis.groups if ("grow0_out", 0) in g.members)
    keep = {grow0.id: [0, 2]}
    masked = masked_model(model, keep, analysis)
    muls = [n for n in masked.graph.node if n.op_type == "Mul"]
    readers = {n.name: n for n in masked.graph.node}
    assert {readers[r].input[0] for r in grow0.consumers} == {m.output[0] for m in muls}
    x = inputs()
    assert compare_outputs(run(masked, x), run(prune_channel_groups(model, keep, analysis), x))[1] <= TOLERANCE


def test_split_sizes_slice_bounds_and_depthwise_group_are_rewritten():
    model = cg.c2f()
    analysis = channel_groups(model)
    second = next(g for g in analysis.groups if ("cv1_out", 4) in g.members)
    pruned = prune_channel_groups(model, {second.id: [0, 3, 7]}, analysis)
    split = next(n for n in pruned.graph.node if n.op_type == "Split")
    assert GraphIndex(pruned.graph).constant(split.input[1]).tolist() == [4, 3]

    model = cg.channel_ranges()
    analysis = channel_groups(model)
    low, middle, high = (next(g for g in analysis.groups if ("stem_out", s) in g.members) for s in (0, 4, 8))
    pruned = prune_channel_groups(model, {low.id: [1, 3], middle.id: [0, 2, 3], high.id: [2]}, analysis)
    index = GraphIndex(pruned.graph)
    gather = next(n for n in pruned.graph.node if n.op_type == "Gather")
    assert index.constant(gather.input[1]).tolist() == [2, 3, 4]  # after the 2 kept low channels
    bounds = [(index.constant(n.input[1]).tolist(), index.constant(n.input[2]).tolist())
              for n in pruned.graph.node if n.op_type == "Slice"]
    assert bounds == [([0], [2]), ([5], [6])]

    model = cg.depthwise_stack()
    analysis = channel_groups(model)
    expanded = next(g for g in analysis.groups if ("expand0_out", 0) in g.members)
    pruned = prune_channel_groups(model, {expanded.id: [0, 5, 9]}, analysis)
    dw = next(n for n in pruned.graph.node if n.name == "dw0")
    assert get_attr(dw, "group") == 3 and GraphIndex(pruned.graph).constant(dw.input[1]).shape == (3, 1, 3, 3)


def test_a_shared_weight_gets_a_renamed_copy():
    """Two Convs read one weight; only one reads a pruned group: the other keeps the original."""
    model = cg.residual_chain(blocks=1)
    head = next(n for n in model.graph.node if n.name == "head")
    extra = onnx.helper.make_node("Conv", ["input", "share.w"], ["side_out"], name="side")
    model.graph.initializer.append(numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "share.w"))
    model.graph.initializer.append(numpy_helper.from_array(np.ones((4, 8, 3, 3), np.float32) * 0.1, "share8.w"))
    head.input[1] = "share8.w"
    del head.input[2:]
    model.graph.node.insert(1, extra)
    model.graph.output.append(onnx.helper.make_tensor_value_info("side_out", onnx.TensorProto.FLOAT, None))
    twin = onnx.helper.make_node("Conv", ["relu1_out", "share8.w"], ["twin_out"], name="twin")
    model.graph.node.insert(2, twin)
    model.graph.output.append(onnx.helper.make_tensor_value_info("twin_out", onnx.TensorProto.FLOAT, None))
    analysis = channel_groups(model)
    stream = next(g for g in analysis.groups if ("stem_out", 0) in g.members)
    assert {"head", "twin"} <= set(stream.consumers)
    pruned = prune_channel_groups(model, {stream.id: [0, 1, 2]}, analysis)
    index = GraphIndex(pruned.graph)
    names = {n.name: n.input[1] for n in pruned.graph.node if n.name in ("head", "twin", "side")}
    assert names["side"] == "share.w" and index.constant("share.w").shape == (4, 3, 1, 1)
    assert names["head"] != names["twin"] and "share8.w" not in names.values()
    assert {index.constant(names[k]).shape for k in ("head", "twin")} == {(4, 3, 3, 3)}
    x = inputs()
    masked = masked_model(model, {stream.id: [0, 1, 2]}, analysis)
    assert compare_outputs(run(masked, x), run(pruned, x))[1] <= TOLERANCE


def test_pruning_is_deterministic():
    model = cg.mixed()
    keep = random_keep(channel_groups(model), 3)
    first, second = prune_channel_groups(model, keep), prune_channel_groups(model, keep)
    assert first.SerializeToString() == second.SerializeToString()


MIXED = cg.mixed()
MIXED_ANALYSIS = channel_groups(MIXED)
PRUNABLE = [g for g in MIXED_ANALYSIS.groups if g.prunable]


@st.composite
def keep_sets(draw):
    keep = {}
    for group in PRUNABLE:
        if draw(st.booleans()):
            chosen = draw(st.sets(st.integers(0, group.width - 1), min_size=1, max_size=group.width))
            keep[group.id] = sorted(chosen)
    return keep


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(keep_sets())
def test_property_pruned_equals_masked_on_residual_se_concat(keep):
    x = inputs(1)
    pruned = prune_channel_groups(MIXED, keep, MIXED_ANALYSIS)
    got = run(pruned, x)
    assert [o.shape for o in got] == [o.shape for o in run(MIXED, x)]
    assert compare_outputs(run(masked_model(MIXED, keep, MIXED_ANALYSIS), x), got)[1] <= TOLERANCE
