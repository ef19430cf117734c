"""analysis.py: which Convs are prunable, each documented skip reason (first failing rule wins),
and ``foldable_chain`` — a producer is found only through a private chain of channel-wise ops."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphs import FAMILIES
from onnxprune.ir.analysis import find_prunable_convs, foldable_chain, foldable_producer, is_depthwise
from onnxprune.ir.graph import GraphIndex


def _init(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _conv_model(c_in=32, c_out=32, group=1, k=3, rank=4, dtype=np.float32, weight_as_input=False,
                dynamic_weight=False, dynamic_bias=False, name="conv"):
    """One Conv on a [N, c_in, 8, 8] input (rank 3: a 1-D Conv), weight/bias shaped as asked."""
    spatial = [8] * (rank - 2)
    weight_shape = [c_out, c_in // group] + [k] * (rank - 2)
    rng = np.random.default_rng(0)
    inits = [_init("w", rng.standard_normal(weight_shape), dtype)]
    nodes = []
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c_in, *spatial])]
    weight = "w"
    if dynamic_weight:  # the weight is computed in the graph, not a constant
        nodes.append(helper.make_node("Identity", ["w"], ["w_dyn"], name="id"))
        weight = "w_dyn"
    if weight_as_input:  # IR >= 4: an initializer that is also an input is an overridable default
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, weight_shape))
    conv_inputs = ["x", weight]
    if dynamic_bias:
        inputs.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, [c_out]))
        conv_inputs.append("b")
    nodes.append(helper.make_node("Conv", conv_inputs, ["y"], name=name, group=group,
                                  kernel_shape=[k] * (rank - 2), pads=[k // 2] * (2 * (rank - 2))))
    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _only_reason(model, groups=4, min_channels=16, exclude=()):
    prunable, skipped = find_prunable_convs(model, lambda info: groups, min_channels, exclude)
    assert prunable == [] and len(skipped) == 1
    return skipped[0].reason


def test_a_plain_conv_is_prunable_with_its_shape():
    prunable, skipped = find_prunable_convs(_conv_model(c_in=24, c_out=32, k=3), lambda info: 4, 16)
    assert skipped == []
    [info] = prunable
    assert (info.name, info.weight, info.c_out, info.c_in, info.kernel) == ("conv", "w", 32, 24, (3, 3))


@pytest.mark.parametrize("model, fragment", [
    (_conv_model(), None),  # prunable: the control
    (_conv_model(dynamic_weight=True), "weight is not a constant (dynamic weight)"),
    (_conv_model(weight_as_input=True), "weight is a graph input"),
    (_conv_model(dtype=np.int32), "weight dtype int32 is not floating point"),
    (_conv_model(rank=3), "not a 2-D convolution (weight rank 3)"),
    (_conv_model(dynamic_bias=True), "bias is not a constant"),
    (_conv_model(group=32), "depthwise"),
    (_conv_model(group=2), "already grouped (group=2)"),
    (_conv_model(c_in=8), "too few channels (C_in=8 < min-channels 16)"),
    (_conv_model(c_out=8), "too few channels (C_out=8 < min-channels 16)"),
    (_conv_model(c_out=24), "C_out=24 not divisible by groups=16"),
])
def test_each_skip_reason(model, fragment):
    prunable, skipped = find_prunable_convs(model, lambda info: 16, 16)
    if fragment is None:
        assert [i.name for i in prunable] == ["conv"] and skipped == []
    else:
        assert prunable == [] and [s.name for s in skipped] == ["conv"]
        assert fragment in skipped[0].reason
        if fragment == "depthwise":
            assert skipped[0].reason == "depthwise"


def test_exclude_is_checked_first():
    """A depthwise Conv named by --exclude gives the exclude reason (the first rule that fails)."""
    assert _only_reason(_conv_model(group=32), exclude=["conv"]) == "excluded by --exclude"
    assert _only_reason(_conv_model(), exclude=["conv"]) == "excluded by --exclude"
    assert find_prunable_convs(_conv_model(), lambda info: 4, 16, exclude=["other"])[0]


def test_min_channels_is_the_callers():
    assert find_prunable_convs(_conv_model(c_in=8), lambda info: 4, 8)[0]
    assert "too few channels" in _only_reason(_conv_model(c_in=8), min_channels=9)


def test_groups_for_sees_each_prunable_layer_and_decides_divisibility():
    """``groups_for`` is asked per layer with its ConvInfo; its answer alone decides divisibility."""
    model = FAMILIES["vgg"]().model()  # conv1 3->32, conv3 32->32, conv6 32->64, conv8 64->32
    asked = []

    def groups_for(info):
        asked.append((info.name, info.c_in, info.c_out))
        return 64 if info.c_out == 64 else 3  # 64 | 64; 3 divides neither 32

    prunable, skipped = find_prunable_convs(model, groups_for, 16)
    assert [i.name for i in prunable] == ["conv6"]
    assert {s.name: s.reason for s in skipped} == {
        "conv1": "too few channels (C_in=3 < min-channels 16)",
        "conv3": "C_out=32 not divisible by groups=3", "conv8": "C_out=32 not divisible by groups=3"}
    # a layer already skipped is not asked about
    assert sorted(asked) == [("conv3", 32, 32), ("conv6", 32, 64), ("conv8", 64, 32)]


def test_constant_node_weights_are_not_constants_until_normalized():
    """GraphIndex.constant sees initializers only; normalize turns Constant nodes into them."""
    from onnxprune.ir.normalize import normalize

    model = FAMILIES["vgg"](constant_weights=True).model()
    _, skipped = find_prunable_convs(model, lambda info: 4, 16)
    assert {s.reason for s in skipped} == {"weight is not a constant (dynamic weight)"}
    prunable, _ = find_prunable_convs(normalize(model), lambda info: 4, 16)
    assert [i.name for i in prunable] == ["conv3", "conv6", "conv8"]


# -- foldable_chain ---------------------------------------------------------------------------

class _Chain:
    """producer Conv -> ops ... -> consumer Conv, built node by node."""

    def __init__(self, channels=16, producer_group=1):
        self.c = channels
        self.nodes, self.inits = [], []
        self._const("pw", np.ones((channels, channels // producer_group, 1, 1)))
        self.nodes.append(helper.make_node("Conv", ["x", "pw"], ["t0"], name="producer", group=producer_group))
        self.tensor, self.n = "t0", 0

    def _const(self, name, value):
        self.inits.append(_init(name, value))
        return name

    def op(self, op_type, extra=(), **attrs):
        self.n += 1
        out = f"t{self.n}"
        self.nodes.append(helper.make_node(op_type, [self.tensor, *extra], [out], name=f"{op_type}{self.n}", **attrs))
        self.tensor = out
        return self

    def depthwise(self):
        name = self._const(f"dw{self.n}", np.ones((self.c, 1, 3, 3)))
        return self.op("Conv", [name], group=self.c, pads=[1, 1, 1, 1])

    def bn(self, constant=True):
        names = [self._const(f"bn{self.n}_{p}", np.ones(self.c)) for p in "sbmv"]
        if not constant:
            names[0] = "x_scale"
        return self.op("BatchNormalization", names)

    def index(self, extra_reader=False, extra_inputs=()):
        self._const("cw", np.ones((8, self.c, 1, 1)))
        self.nodes.append(helper.make_node("Conv", [self.tensor, "cw"], ["y"], name="consumer"))
        outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
        if extra_reader:  # a second reader of a tensor on the chain
            self.nodes.append(helper.make_node("Relu", ["t1"], ["side"], name="side"))
            outputs.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, None))
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", self.c, 8, 8])]
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [self.c]) for n in extra_inputs]
        return GraphIndex(helper.make_graph(self.nodes, "g", inputs, outputs, self.inits))


def test_chain_through_channelwise_ops_and_a_depthwise_conv():
    chain = _Chain()
    bounds = [chain._const("lo", 0.0), chain._const("hi", 6.0)]
    chain.op("Relu").op("Clip", bounds).bn().depthwise().op("Relu")
    chain.op("Mul", [chain._const("scale", np.ones((16, 1, 1)))]).op("MaxPool", kernel_shape=[1, 1])
    index = chain.index()
    assert foldable_chain(index, "consumer") == ("producer", ["Conv4"])
    assert foldable_producer(index, "consumer") == "producer"
    assert is_depthwise(index, next(n for n in index.graph.node if n.name == "Conv4"))


def test_direct_producer():
    assert foldable_chain(_Chain().index(), "consumer") == ("producer", [])


def _prelu_chain():
    chain = _Chain()
    return chain.op("PRelu", [chain._const("slope", [0.1])]).index()


@pytest.mark.parametrize("build", [
    lambda: _Chain().op("Relu").index(extra_reader=True),  # t1 has two readers
    lambda: _prelu_chain(),  # PRelu is excluded, even with a constant scalar slope
    lambda: _Chain().bn(constant=False).index(extra_inputs=["x_scale"]),  # BN with a non-constant scale
    lambda: _Chain().op("Clip", ["x_lo"]).index(extra_inputs=["x_lo"]),  # Clip with a non-constant bound
    lambda: _Chain().op("Add", ["x_b"]).index(extra_inputs=["x_b"]),  # Add of a non-constant
    lambda: _Chain().op("Transpose", perm=[0, 2, 3, 1]).index(),  # not channel-wise
    lambda: _Chain(producer_group=2).index(),  # the producer is grouped (not depthwise)
], ids=["two-readers", "prelu", "bn-dynamic", "clip-dynamic", "add-dynamic", "transpose", "grouped-producer"])
def test_no_chain(build):
    assert foldable_chain(build(), "consumer") == (None, [])


def test_graph_input_and_unknown_names_have_no_producer():
    index = _Chain().index()
    assert foldable_chain(index, "producer") == (None, [])  # reads the graph input x
    assert foldable_chain(index, "nonexistent") == (None, [])


def test_a_tensor_that_is_also_a_graph_output_is_not_private():
    index = _Chain().op("Relu").index()
    index.graph.output.append(helper.make_tensor_value_info("t1", TensorProto.FLOAT, None))
    assert foldable_chain(GraphIndex(index.graph), "consumer") == (None, [])
