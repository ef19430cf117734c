"""Normalization folds per-channel affine ops into Convs without changing outputs."""

import numpy as np
from onnx import helper

from graphs import GraphBuilder, resnet_basic
from onnxprune.ir.normalize import normalize, per_channel_vector
from oracle import feeds_for, rel_diff, run


def _ops(model):
    return [n.op_type for n in model.graph.node]


def test_batchnorm_folds_into_conv_and_outputs_match():
    model = resnet_basic(bn=True).model()
    folded = normalize(model)
    assert "BatchNormalization" in _ops(model)
    assert "BatchNormalization" not in _ops(folded)
    feeds = feeds_for(model)
    assert rel_diff(run(model, feeds), run(folded, feeds)) < 1e-5


def test_weight_name_kept_when_unshared():
    model = resnet_basic(bn=True).model()
    folded = normalize(model)
    def conv_weights(m):
        return [n.input[1] for n in m.graph.node if n.op_type == "Conv"]
    assert conv_weights(model) == conv_weights(folded)


def test_mul_and_add_constants_fold():
    b = GraphBuilder(channels=8)
    x = b.conv("input", 16)
    x = b.mul_const(x)
    add = b._const("shift", np.arange(16, dtype=np.float32).reshape(1, 16, 1, 1))
    x = b._op("Add", [add, x], shape_from=1)  # constant first
    b.output(b.relu(x))
    model = b.model()
    folded = normalize(model)
    assert _ops(folded) == ["Conv", "Relu"]
    feeds = feeds_for(model)
    assert rel_diff(run(model, feeds), run(folded, feeds)) < 1e-5


def test_mul_by_non_channel_tensor_is_not_folded():
    b = GraphBuilder(channels=8, size=4)
    x = b.conv("input", 16)
    spatial = b._const("spatial", np.ones((1, 1, 4, 4), dtype=np.float32) * 2)
    b.output(b._op("Mul", [x, spatial]))
    assert _ops(normalize(b.model())) == ["Conv", "Mul"]


def test_conv_output_with_two_consumers_is_not_folded():
    b = GraphBuilder(channels=8)
    x = b.conv("input", 16)
    b.output(b.bn(x))
    b.output(b.relu(x))
    assert "BatchNormalization" in _ops(normalize(b.model()))


def test_shared_weight_gets_a_new_name_when_folded():
    b = GraphBuilder(channels=16)
    first = b.conv("input", 16, name="c1")
    second_out = "c2_out"
    b.nodes.append(helper.make_node("Conv", [first, "c1.weight", "c1.bias"], [second_out], name="c2",
                                    kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
    b.shape[second_out] = b.shape[first]
    b.output(b.bn(second_out))
    model = b.model()
    folded = normalize(model)
    weights = [n.input[1] for n in folded.graph.node if n.op_type == "Conv"]
    assert weights[0] == "c1.weight" and weights[1] != "c1.weight"
    feeds = feeds_for(model)
    assert rel_diff(run(model, feeds), run(folded, feeds)) < 1e-5


def test_unnamed_nodes_get_stable_names():
    model = resnet_basic().model()
    for node in model.graph.node:
        node.name = ""
    names = [n.name for n in normalize(model).graph.node]
    assert all(names) and len(set(names)) == len(names)
    assert names == [n.name for n in normalize(model).graph.node]


def test_per_channel_vector_rules():
    assert np.array_equal(per_channel_vector(np.arange(4.0).reshape(4, 1, 1), 4, 4), np.arange(4.0))
    assert np.array_equal(per_channel_vector(np.float32(2.0), 4, 4), np.full(4, 2.0))
    assert per_channel_vector(np.ones((1, 4, 2, 1)), 4, 4) is None
    assert per_channel_vector(np.ones(4), 4, 4) is None  # broadcasts along width, not channels


def test_filled_parameters_become_initializers():
    """The onnx package's IR-3 test models make every weight with ConstantOfShape of a constant
    shape; their Convs were skipped as "dynamic weight" and their BNs never folded. A filled map
    read by anything else (a mask added to an activation) stays a node."""
    from onnx import TensorProto, numpy_helper

    def filled(name, dims, value):
        return [helper.make_node("Constant", [], [f"{name}_shape"], value=numpy_helper.from_array(
                    np.array(dims, np.int64), f"{name}_dims")),
                helper.make_node("ConstantOfShape", [f"{name}_shape"], [name],
                                 value=helper.make_tensor("v", TensorProto.FLOAT, [1], [value]))]

    nodes = [*filled("w", [16, 8, 3, 3], 0.02), *filled("scale", [16], 1.5), *filled("shift", [16], 0.1),
             *filled("mean", [16], 0.0), *filled("var", [16], 1.0), *filled("mask", [1, 16, 6, 6], 1.0),
             helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["b"]),
             helper.make_node("Add", ["b", "mask"], ["y"])]
    graph = helper.make_graph(nodes, "filled", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 6, 6])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    folded = normalize(model)
    assert _ops(folded) == ["ConstantOfShape", "Conv", "Add"]  # the mask's Constant became an initializer
    assert next(n for n in folded.graph.node if n.op_type == "ConstantOfShape").output[0] == "mask"
    feeds = feeds_for(model)
    assert rel_diff(run(model, feeds), run(folded, feeds)) < 1e-5
