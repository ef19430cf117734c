"""macs.py: MACs and parameter counts against arithmetic done by hand or by the test builders."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphs import FAMILIES
from onnxprune.ir.macs import conv_macs, count_macs, count_params


def test_conv_macs_formula():
    # 64 filters over 32/4 = 8 channels per group, 3x3 kernel, 10x12 output, batch 2
    assert conv_macs(64, 8, (3, 3), (10, 12), batch=2) == 2 * 64 * 8 * 9 * 120
    assert conv_macs(1, 1, (1, 1), (1, 1)) == 1
    assert conv_macs(16, 16, [5, 1], [7, 7]) == 16 * 16 * 5 * 49
    # no int32 overflow on a big layer
    assert conv_macs(2048, 2048, (3, 3), (512, 512), batch=8) == 8 * 2048 * 2048 * 9 * 512 * 512


def _one_conv(c_in, c_out, size, k, stride=1, group=1, dilation=1, pads=(0, 0, 0, 0), batch="N"):
    w = numpy_helper.from_array(np.zeros((c_out, c_in // group, k, k), np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[k, k], strides=[stride] * 2,
                            group=group, dilations=[dilation] * 2, pads=list(pads))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         [batch, c_in, *size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("kw, out_hw", [
    (dict(c_in=16, c_out=32, size=(20, 20), k=3), (18, 18)),
    (dict(c_in=16, c_out=32, size=(20, 20), k=3, pads=(1, 1, 1, 1)), (20, 20)),
    (dict(c_in=16, c_out=32, size=(20, 21), k=3, stride=2, pads=(1, 1, 1, 1)), (10, 11)),
    (dict(c_in=16, c_out=32, size=(20, 20), k=3, dilation=2), (16, 16)),  # effective kernel 5
    (dict(c_in=16, c_out=32, size=(20, 20), k=3, pads=(0, 2, 1, 0)), (19, 20)),  # asymmetric pads
    (dict(c_in=16, c_out=32, size=(20, 20), k=3, group=4, pads=(1, 1, 1, 1)), (20, 20)),
    (dict(c_in=16, c_out=16, size=(20, 20), k=3, group=16, stride=2, pads=(1, 1, 1, 1)), (10, 10)),  # depthwise
])
def test_count_macs_of_one_conv_by_hand(kw, out_hw):
    # out = floor((size + pad_begin + pad_end - dilation*(k-1) - 1) / stride) + 1, computed above by hand
    expected = kw["c_out"] * out_hw[0] * out_hw[1] * (kw["c_in"] // kw.get("group", 1)) * kw["k"] ** 2
    total, per_node = count_macs(_one_conv(**kw))
    assert per_node == {"conv": expected} and total == expected


def test_symbolic_batch_counts_at_one_and_fixed_batch_multiplies():
    one = count_macs(_one_conv(8, 8, (6, 6), 3))[0]
    assert one == 8 * 8 * 9 * 16
    assert count_macs(_one_conv(8, 8, (6, 6), 3, batch=3))[0] == 3 * one


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_count_macs_matches_the_builders_count(family):
    builder = FAMILIES[family]()
    total, per_node = count_macs(builder.model())
    assert total == builder.macs()
    for name, (per_channel, c_in) in builder.conv_macs.items():
        assert per_node[name] == per_channel * c_in


def test_symbolic_spatial_dims_count_at_the_given_or_default_shape():
    from onnxprune.ir.shapes import DEFAULT_DIM, resolve_input_shapes

    model = FAMILIES["vgg"](size=16).model()
    for axis, name in ((2, "H"), (3, "W")):
        dim = model.graph.input[0].type.tensor_type.shape.dim[axis]
        dim.Clear()
        dim.dim_param = name
    model.graph.output[0].type.tensor_type.ClearField("shape")
    shapes = resolve_input_shapes(model, {"input": [1, 3, 32, 32]})
    assert count_macs(model, shapes)[0] == FAMILIES["vgg"](size=32).macs() == 4 * FAMILIES["vgg"](size=16).macs()
    assert count_macs(model)[0] == FAMILIES["vgg"](size=DEFAULT_DIM).macs()


def test_gemm_matmul_and_conv_transpose():
    inits = [numpy_helper.from_array(np.zeros(s, np.float32), n) for n, s in
             (("a", (10, 6)), ("b", (6, 7)), ("bt", (5, 6)), ("wt", (4, 3, 2, 2)))]
    nodes = [helper.make_node("MatMul", ["x", "b"], ["m"], name="matmul"),  # [2, 10, 6] @ [6, 7]
             helper.make_node("Gemm", ["a", "b"], ["g"], name="gemm"),  # [10, 6] @ [6, 7]
             helper.make_node("Gemm", ["b", "bt"], ["gt"], name="gemm_t", transA=1, transB=1),  # [6,7]^T @ [5,6]^T
             helper.make_node("ConvTranspose", ["img", "wt"], ["ct"], name="deconv", strides=[2, 2])]
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "g", [vi("x", TensorProto.FLOAT, [2, 10, 6]),
                                           vi("img", TensorProto.FLOAT, [1, 4, 5, 5])],
                              [vi(n, TensorProto.FLOAT, None) for n in ("m", "g", "gt", "ct")], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    total, per_node = count_macs(model)
    assert per_node["matmul"] == 2 * 10 * 7 * 6
    assert per_node["gemm"] == 10 * 7 * 6
    # transA: A=[6,7] read as [7,6] (K=6), B^T = [7,5]: output [7,5], K = A.shape[0] = 6
    assert per_node["gemm_t"] == 7 * 5 * 6
    # each of the 4*5*5 input values meets C_out/group * k*k = 3*2*2 weights
    assert per_node["deconv"] == 4 * 25 * 3 * 4
    assert total == sum(per_node.values())


def test_count_params_counts_float_initializers_only():
    model = _one_conv(16, 32, (8, 8), 3)
    model.graph.initializer.extend([numpy_helper.from_array(np.zeros(32, np.float16), "bias16"),
                                    numpy_helper.from_array(np.zeros(5, np.int64), "indices")])
    assert count_params(model) == 32 * 16 * 9 + 32
    assert count_params(FAMILIES["resnet_basic"](bn=False).model()) == sum(
        int(np.prod(t.dims)) for t in FAMILIES["resnet_basic"](bn=False).model().graph.initializer
        if t.data_type == TensorProto.FLOAT)
