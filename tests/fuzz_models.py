"""Random small CNN graphs for the property-based tests (issue 12, item 6).

A hypothesis strategy draws a *recipe* (plain tuples: input size, blocks, head), and ``build``
turns it into an ONNX model with ``graphs.GraphBuilder``. Why recipes rather than models: a
failing example then shrinks to the fewest, simplest blocks, and its printed recipe rebuilds
the model exactly.

Blocks cover what real exports contain around prunable Convs: plain Conv(+BN) with odd kernels
and strides, depthwise Convs, residual Adds, Concat of branches, an SE-like gate (GAP -> 1x1
Conv -> ReLU -> 1x1 Conv -> Sigmoid -> Mul), and the layout and odd ops the channel
permutation must survive or stop at: Pad (constant/reflect/edge), Resize, MaxPool/AveragePool,
Transpose (HW swap, NHWC round trip), a channel Slice, bounded activations. Shapes are odd on
purpose (H != W, 5..19 pixels, channel counts such as 12, 17, 24, 40).
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from graphs import GraphBuilder

CHANNELS = st.sampled_from([8, 12, 17, 24, 32, 40, 48, 64])

BLOCKS = st.one_of(
    st.tuples(st.just("conv"), CHANNELS, st.sampled_from([1, 3, 5]), st.sampled_from([1, 2]), st.booleans()),
    st.tuples(st.just("depthwise"), st.sampled_from([3, 5]), st.sampled_from([1, 2])),
    st.tuples(st.just("residual"), CHANNELS, st.booleans()),
    st.tuples(st.just("concat"), CHANNELS, CHANNELS, st.booleans()),
    st.tuples(st.just("se"), st.sampled_from([2, 4])),
    st.tuples(st.just("pad"), st.sampled_from(["constant", "reflect", "edge"])),
    st.tuples(st.just("resize")),
    st.tuples(st.just("maxpool")),
    st.tuples(st.just("avgpool")),
    st.tuples(st.just("transpose_hw")),
    st.tuples(st.just("nhwc_roundtrip")),
    st.tuples(st.just("slice_channels"), st.sampled_from([0.25, 0.5, 0.75])),
    st.tuples(st.just("activation"), st.sampled_from(["Sigmoid", "HardSigmoid", "Clip", "LeakyRelu", "Relu"])),
)


@st.composite
def recipes(draw):
    return {
        "opset": draw(st.sampled_from([13, 17])),
        "batch": draw(st.sampled_from(["N", 1])),
        "channels": draw(st.sampled_from([1, 3, 4])),
        "size": (draw(st.integers(5, 19)), draw(st.integers(5, 19))),
        "stem": draw(CHANNELS),
        "blocks": draw(st.lists(BLOCKS, min_size=1, max_size=5)),
        "head": draw(st.sampled_from(["gemm", "map", "flatten_gemm", "two_outputs"])),
        "classes": draw(st.sampled_from([1, 2, 10])),
        "seed": draw(st.integers(0, 2**16)),
    }


class _Builder(GraphBuilder):
    """GraphBuilder with a non-square input and the odd ops the fuzzer needs."""

    def __init__(self, channels, size, opset, batch, seed):
        super().__init__(channels=channels, size=size[0], opset=opset, batch=batch, seed=seed)
        h, w = size
        self.input = helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, channels, h, w])
        self.shape["input"] = (channels, h, w)

    def int_const(self, values):
        name = self._name("ints")
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
        return name

    def float_const(self, values):
        name = self._name("floats")
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype=np.float32), name))
        return name

    def with_shape(self, out, shape):
        self.shape[out] = tuple(shape)
        return out

    def gap(self, x):
        return self.with_shape(self._op("GlobalAveragePool", [x]), (self.shape[x][0], 1, 1))

    def conv1x1(self, x, c_out):
        """A 1x1 Conv with no padding (GraphBuilder.conv pads k // 2, which is 0 here)."""
        return self.conv(x, c_out, k=1)


def build(recipe):
    """The ONNX model of ``recipe`` (see ``recipes``)."""
    b = _Builder(recipe["channels"], recipe["size"], recipe["opset"], recipe["batch"], recipe["seed"])
    x = b.relu(b.conv("input", recipe["stem"]))
    for block in recipe["blocks"]:
        x = _block(b, x, block)
    _head(b, x, recipe["head"], recipe["classes"])
    return b.model()


def _block(b, x, block):
    kind = block[0]
    c, h, w = b.shape[x]
    if kind == "conv":
        _, c_out, k, stride, bn = block
        y = b.conv(x, c_out, k=k, stride=stride, bias=not bn)
        return b.relu(b.bn(y) if bn else y)
    if kind == "depthwise":
        _, k, stride = block
        return b.relu(b.conv(x, c, k=k, stride=stride, group=c))
    if kind == "residual":
        _, mid, bn = block
        y = b.relu(b.conv(x, mid, bias=not bn))
        y = b.conv(y, c, bias=not bn)
        return b.relu(b.add(b.bn(y) if bn else y, x))
    if kind == "concat":
        _, c1, c2, keep_input = block
        left = b.relu(b.conv(x, c1, k=1))
        right = b.relu(b.conv(b.relu(b.conv(x, c2, k=1)), c2))
        return b.concat([left, right, x] if keep_input else [left, right])
    if kind == "se":
        squeeze = b.relu(b.conv1x1(b.gap(x), max(1, c // block[1])))
        gate = b._op("Sigmoid", [b.conv1x1(squeeze, c)])
        return b._op("Mul", [x, gate])
    if kind == "pad":
        mode = block[1] if min(h, w) > 2 else "constant"  # reflect needs more pixels than the pad
        out = b._op("Pad", [x, b.int_const([0, 0, 1, 1, 0, 0, 1, 2])], mode=mode)
        return b.with_shape(out, (c, h + 2, w + 3))
    if kind == "resize":
        if h * w > 200:
            return x
        out = b._op("Resize", [x, "", b.float_const([1, 1, 2, 2])], mode="nearest")
        return b.with_shape(out, (c, 2 * h, 2 * w))
    if kind == "maxpool":
        return b.maxpool(x) if min(h, w) >= 2 else x
    if kind == "avgpool":
        return b._op("AveragePool", [x], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])
    if kind == "transpose_hw":
        return b.with_shape(b._op("Transpose", [x], perm=[0, 1, 3, 2]), (c, w, h))
    if kind == "nhwc_roundtrip":
        t = b.with_shape(b._op("Transpose", [x], perm=[0, 2, 3, 1]), (h, w, c))
        t = b._op("Relu", [t])
        return b.with_shape(b._op("Transpose", [t], perm=[0, 3, 1, 2]), (c, h, w))
    if kind == "slice_channels":
        keep = max(1, int(c * block[1]))
        out = b._op("Slice", [x, b.int_const([0]), b.int_const([keep]), b.int_const([1])])
        return b.with_shape(out, (keep, h, w))
    if kind == "activation":
        op = block[1]
        if op == "Clip":
            return b._op("Clip", [x, b.float_const(0.0), b.float_const(6.0)])
        return b._op(op, [x])
    raise ValueError(kind)


def _head(b, x, head, classes):
    if head == "map":
        b.output(b.conv(x, 8, k=1))
        return
    if head == "flatten_gemm":
        c, h, w = b.shape[x]
        if c * h * w <= 4096:
            flat = b.with_shape(b._op("Flatten", [x], axis=1), (c * h * w,))
            b.output(b.gemm(flat, classes))
            return
    if head == "two_outputs":
        b.output(b.conv(x, 8, k=1))
    b.output(b.gemm(b.gap_flatten(x), classes))
