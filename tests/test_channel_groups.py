"""channel_groups: which channels the analysis couples, and what it freezes (with the reason).

The expected groups are written from the graphs' structure (tests/coupled_graphs.py), not read
back from the analysis.
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import coupled_graphs as cg
from onnxprune.channels.channel_groups import channel_groups
from onnxprune.errors import UserError


def group_of(analysis, tensor, offset=0):
    return next(g for g in analysis.groups if (tensor, offset) in g.members)


def tensors(group):
    return {t for t, _ in group.members}


def test_residual_blocks_share_one_stream_group():
    analysis = channel_groups(cg.residual_chain(blocks=3))
    stream = group_of(analysis, "stem_out")
    assert stream.prunable and stream.width == 8
    assert stream.producers == ("stem", "b0b", "b1b", "b2b")
    assert stream.consumers == ("b0a", "b1a", "b2a", "head")
    assert {"add3_out", "add6_out", "add9_out", "relu10_out"} <= tensors(stream)
    for i, inner in enumerate(("b0a_out", "b1a_out", "b2a_out")):
        group = group_of(analysis, inner)
        assert (group.width, group.producers, group.consumers) == (6, (f"b{i}a",), (f"b{i}b",))


@pytest.mark.parametrize("build, gate, squeeze_op", [
    (cg.se_block, "sigmoid6_out", "conv3"),
    (lambda: cg.se_block("HardSigmoid", reduce_mean=True), "hardsigmoid6_out", "conv3"),
    (cg.se_gemm_block, "reshape9_out", "fc4"),
])
def test_se_gate_ties_the_excitation_output_to_the_stream(build, gate, squeeze_op):
    analysis = channel_groups(build())
    stream = group_of(analysis, "stem_out")
    assert stream.prunable and stream.width == 8
    assert len(stream.producers) == 2 and stream.producers[0] == "stem"  # stem + the excitation layer
    assert stream.consumers == (squeeze_op, "head")
    assert gate in tensors(stream)
    squeeze = group_of(analysis, f"{squeeze_op}_out")
    assert squeeze.prunable and squeeze.width == 4 and squeeze.consumers == stream.producers[1:]


def test_c2f_split_halves_are_separate_groups_with_concat_offsets():
    analysis = channel_groups(cg.c2f())
    first = group_of(analysis, "cv1_out", 0)
    second = group_of(analysis, "cv1_out", 4)
    assert first.width == 4 and set(first.members) >= {("split3_out0", 0), ("concat7_out", 0)}
    assert second.width == 8 and set(second.members) >= {("split3_out1", 0), ("concat7_out", 4), ("concat7_out", 12)}
    assert first.producers == ("cv1",) and second.producers == ("cv1", "m_b")
    assert first.prunable and second.prunable


def test_densenet_concat_growth_keeps_each_layers_channels_at_their_offsets():
    analysis = channel_groups(cg.densenet())
    assert set(group_of(analysis, "stem_out").members) >= {("concat4_out", 0), ("concat7_out", 0)}
    grow0 = group_of(analysis, "grow0_out")
    assert set(grow0.members) >= {("concat4_out", 6), ("concat7_out", 6)}
    assert grow0.consumers == ("grow1", "transition")
    assert ("concat7_out", 10) in group_of(analysis, "grow1_out").members


def test_depthwise_conv_passes_its_channels_through():
    analysis = channel_groups(cg.depthwise_stack())
    expanded = group_of(analysis, "expand0_out")
    assert expanded.prunable and "dw0" in expanded.passthrough and "dw0_out" in tensors(expanded)
    assert expanded.producers == ("expand0",) and expanded.consumers == ("project0",)
    assert group_of(analysis, "stem_out").producers == ("stem", "project0", "project1")


def test_transpose_keeping_the_channel_axis_ties_and_an_nhwc_detour_freezes():
    analysis = channel_groups(cg.transposes())
    kept = group_of(analysis, "kept_out")
    assert kept.prunable and "transpose2_out" in tensors(kept)
    detour = group_of(analysis, "detour_out")
    assert not detour.prunable
    assert detour.frozen_by == (("transpose4", "Transpose", "moves the channel axis (perm=[0, 2, 3, 1])"),)


def test_flatten_after_global_pooling_maps_channel_to_feature_and_a_2x2_map_to_blocks():
    analysis = channel_groups(cg.flatten_heads())
    pooled = group_of(analysis, "stem_out")
    assert "flatten3_out" in tensors(pooled) and pooled.consumers == ("fc4", "to_map")
    blocks = group_of(analysis, "to_map_out")
    assert blocks.prunable and blocks.consumers == ("fc8", "matmul10")
    assert analysis.hidden == {"flatten7_out": ("maxpool6_out", 4)}
    assert {(r.tensor, r.block) for r in analysis.reads if r.block > 1} == {("maxpool6_out", 4)}


def test_reshape_to_a_flat_vector_with_a_literal_width_is_a_block_read():
    analysis = channel_groups(cg.reshape_head())
    assert analysis.hidden == {"reshape4_out": ("maxpool2_out", 4)}
    assert [e.kind for e in analysis.edits if e.node == 3] == ["shape"]  # the [-1, 32] becomes [-1, 4·kept]


def test_conv_transpose_is_producer_and_consumer():
    analysis = channel_groups(cg.deconv())
    assert group_of(analysis, "stem_out").consumers == ("up",)
    assert group_of(analysis, "up_out").producers == ("up",)


def test_spatial_pad_resize_and_per_channel_parameters_pass_through():
    analysis = channel_groups(cg.spatial_ops())
    assert {"pad3_out", "resize5_out"} <= tensors(group_of(analysis, "stem_out"))
    mid = group_of(analysis, "mid_out")
    assert mid.prunable and mid.passthrough == ("add7", "bn8", "prelu10", "resize12")


def test_channel_ranges_and_a_reordering_gather():
    analysis = channel_groups(cg.channel_ranges())
    ranges = [group_of(analysis, "stem_out", start) for start in (0, 4, 8)]
    assert [g.width for g in ranges] == [4, 4, 4]
    assert [g.consumers for g in ranges] == [("lo",), ("mid",), ("hi",)]
    assert ("slice5_out", 0) in ranges[0].members and ("gather7_out", 0) in ranges[1].members
    assert ("slice11_out", 0) in ranges[2].members
    mixed = group_of(analysis, "mix_out")
    assert mixed.frozen_by[0][:2] == ("gather15", "Gather") and "out of order" in mixed.frozen_by[0][2]


def test_softmax_grouped_conv_and_graph_output_freeze_with_reasons():
    analysis = channel_groups(cg.frozen_ops())
    assert group_of(analysis, "stem_out").prunable  # only the ops' own groups freeze
    assert group_of(analysis, "to_softmax_out").frozen_by == (
        ("attn", "Softmax", "Softmax is not known to keep channels apart"),)
    assert group_of(analysis, "after_softmax_out").frozen_by == (
        ("grouped", "Conv", "grouped (group=2): channels tied group by group"),)
    assert group_of(analysis, "exposed_out").frozen_by[0][1] == "GraphOutput"


def test_custom_domain_node_freezes_what_it_reads():
    stream = group_of(channel_groups(cg.custom_domain()), "stem_out")
    assert not stream.prunable
    assert stream.frozen_by == (("mystery", "Mystery", "domain 'com.example': what it does to channels is unknown"),)


def _tiny(nodes, inits, outputs, opset=17):
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
                              outputs, [onnx.numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _conv(name, x, c_in, c_out, inits):
    inits[f"{name}.w"] = np.ones((c_out, c_in, 1, 1), np.float32)
    return helper.make_node("Conv", [x, f"{name}.w"], [f"{name}_out"], name=name)


def test_pad_on_the_channel_axis_and_flatten_of_a_map_read_by_a_non_gemm_freeze():
    inits = {"pads": np.array([0, 1, 0, 0, 0, 1, 0, 0], np.int64)}
    nodes = [_conv("a", "x", 3, 4, inits), helper.make_node("Pad", ["a_out", "pads"], ["p"], name="pad"),
             _conv("b", "p", 6, 4, inits), helper.make_node("Flatten", ["b_out"], ["f"], name="flat"),
             helper.make_node("Relu", ["f"], ["y"], name="r")]
    analysis = channel_groups(_tiny(nodes, inits, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]))
    assert group_of(analysis, "a_out").frozen_by == (("pad", "Pad", "pads the channel axis"),)
    assert group_of(analysis, "b_out").frozen_by[0][:2] == ("flat", "Flatten")
    assert "readers are not all Gemm/MatMul" in group_of(analysis, "b_out").frozen_by[0][2]


def test_a_tensor_read_inside_a_subgraph_freezes():
    inits = {}
    then = helper.make_graph([helper.make_node("Relu", ["a_out"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Neg", ["a_out"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    inits["cond"] = np.array(True)
    nodes = [_conv("a", "x", 3, 4, inits), _conv("b", "a_out", 4, 2, inits),
             helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then, else_branch=other)]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "b_out")]
    group = group_of(channel_groups(_tiny(nodes, inits, outputs)), "a_out")
    assert group.frozen_by == (("branch", "If", "its subgraph reads this tensor"),)


def test_channels_made_by_a_constant_alone_have_no_producer():
    inits = {"c": np.arange(4, dtype=np.float32).reshape(1, 4, 1, 1)}
    nodes = [_conv("a", "x", 3, 1, inits), helper.make_node("Add", ["a_out", "c"], ["s"], name="spread"),
             _conv("b", "s", 4, 2, inits)]
    analysis = channel_groups(_tiny(nodes, inits, [helper.make_tensor_value_info("b_out", TensorProto.FLOAT, None)]))
    spread = group_of(analysis, "s")
    assert spread.width == 4 and not spread.frozen_by and spread.producers == () and not spread.prunable
    with pytest.raises(UserError, match="no producer"):
        analysis.kept_channels({spread.id: [0]})


def test_groups_partition_every_channel_once_and_come_out_in_graph_order():
    analysis = channel_groups(cg.mixed())
    covered = {}
    for group in analysis.groups:
        for tensor, offset in group.members:
            covered.setdefault(tensor, []).extend(range(offset, offset + group.width))
    assert {t: sorted(c) for t, c in covered.items()} == {t: list(range(w)) for t, w in analysis.widths.items()}
    firsts = [list(analysis.widths).index(g.members[0][0]) for g in analysis.groups]
    assert firsts == sorted(firsts)
    assert channel_groups(cg.mixed()) == analysis


def test_kept_channels_validates_the_keep_sets():
    analysis = channel_groups(cg.residual_chain(blocks=1))
    stream = group_of(analysis, "stem_out")
    frozen = group_of(analysis, "head_out")
    for bad, message in (({frozen.id: [0]}, "cannot be pruned"), ({stream.id: [3, 1]}, "sorted"),
                         ({stream.id: []}, "non-empty"), ({stream.id: [8]}, "within"), ({99: [0]}, "no channel group")):
        with pytest.raises(UserError, match=message):
            analysis.kept_channels(bad)
    kept = analysis.kept_channels({stream.id: [1, 5]})
    assert set(kept) == tensors(stream) and all(list(v) == [1, 5] for v in kept.values())
