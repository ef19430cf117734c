"""Synthetic graphs with coupled channels: one per pattern the channel-group analysis handles.

Each function returns a built ``onnx.ModelProto``; key nodes carry fixed names so the analysis
tests can name the groups they expect. ``PATTERNS`` lists the graphs ONNX Runtime can run (the
pruned-equals-masked checks run over all of them).
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from graphs import GraphBuilder


class CoupledBuilder(GraphBuilder):
    """``GraphBuilder`` plus the ops coupled-channel graphs need (explicit output shapes)."""

    def __init__(self, channels=3, size=8, **kw):
        super().__init__(channels=channels, size=size, **kw)

    def const(self, value, dtype=np.float32, base="const"):
        return self._const(self._name(base), value, dtype)

    def op(self, op, inputs, shape, name=None, outputs=1, **attrs):
        name = name or self._name(op.lower())
        outs = [f"{name}_out"] if outputs == 1 else [f"{name}_out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        shapes = shape if outputs > 1 else [shape]
        for out, s in zip(outs, shapes):
            self.shape[out] = tuple(s)
        return outs[0] if outputs == 1 else outs

    def unary(self, op, x, **attrs):
        return self.op(op, [x], self.shape[x], **attrs)

    def mul(self, a, b):
        return self.op("Mul", [a, b], self.shape[a])

    def split(self, x, sizes):
        c, *rest = self.shape[x]
        return self.op("Split", [x, self.const(sizes, np.int64, "split")], [(s, *rest) for s in sizes],
                       outputs=len(sizes), axis=1)

    def slice_channels(self, x, start, end):
        c, *rest = self.shape[x]
        width = len(range(c)[slice(start, end)])
        inputs = [x, self.const([start], np.int64), self.const([end], np.int64), self.const([1], np.int64)]
        return self.op("Slice", inputs, (width, *rest))

    def transpose(self, x, perm):
        dims = ("N",) + self.shape[x]
        moved = tuple(dims[p] for p in perm)
        return self.op("Transpose", [x], moved[1:], perm=list(perm))

    def conv_transpose(self, x, c_out, name=None):
        c_in, h, w = self.shape[x]
        name = name or self._name("deconv")
        weight = self._const(f"{name}.weight", self.rng.standard_normal((c_in, c_out, 2, 2)) / np.sqrt(c_in * 4))
        bias = self._const(f"{name}.bias", self.rng.standard_normal(c_out) * 0.1)
        return self.op("ConvTranspose", [x, weight, bias], (c_out, 2 * h, 2 * w), name=name,
                       kernel_shape=[2, 2], strides=[2, 2])

    def prelu(self, x):
        c = self.shape[x][0]
        return self.op("PRelu", [x, self.const(self.rng.uniform(0.05, 0.3, (c, 1, 1)))], self.shape[x])

    def add_channel_const(self, x):
        c = self.shape[x][0]
        return self.op("Add", [x, self.const(self.rng.standard_normal((1, c, 1, 1)))], self.shape[x])

    def se_conv(self, x, squeeze, gate="Sigmoid", reduce_mean=False):
        """Squeeze-excitation with 1×1 Convs: pool -> Conv -> Relu -> Conv -> gate -> Mul."""
        c = self.shape[x][0]
        if reduce_mean:
            pooled = self.op("ReduceMean", [x], (c, 1, 1), axes=[2, 3], keepdims=1)
        else:
            pooled = self.op("GlobalAveragePool", [x], (c, 1, 1))
        s = self.relu(self.conv(pooled, squeeze, k=1))
        s = self.unary(gate, self.conv(s, c, k=1, name=self._name("excite")))
        return self.mul(x, s)

    def se_gemm(self, x, squeeze):
        """Squeeze-excitation with Gemm FCs: GAP -> Flatten -> Gemm -> Relu -> Gemm ->
        HardSigmoid -> Reshape [-1, C, 1, 1] -> Mul."""
        c = self.shape[x][0]
        s = self.gemm(self.gap_flatten(x), squeeze)
        s = self.unary("HardSigmoid", self.gemm(self.relu(s), c))
        s = self.op("Reshape", [s, self.const([-1, c, 1, 1], np.int64, "shape")], (c, 1, 1))
        return self.mul(x, s)


def residual_chain(blocks=3):
    """A stem and ``blocks`` basic blocks (Conv-Relu-Conv, identity Add) on one stream."""
    b = CoupledBuilder()
    x = b.relu(b.conv("input", 8, name="stem"))
    for i in range(blocks):
        y = b.relu(b.conv(x, 6, name=f"b{i}a"))
        x = b.relu(b.add(b.conv(y, 8, name=f"b{i}b"), x))
    b.output(b.conv(x, 4, name="head"))
    return b.model()


def se_block(gate="Sigmoid", reduce_mean=False):
    b = CoupledBuilder(opset=17)
    x = b.relu(b.conv("input", 8, name="stem"))
    x = b.se_conv(x, 4, gate=gate, reduce_mean=reduce_mean)
    b.output(b.conv(x, 4, name="head"))
    return b.model()


def se_gemm_block():
    b = CoupledBuilder()
    x = b.relu(b.conv("input", 8, name="stem"))
    b.output(b.conv(b.se_gemm(x, 4), 4, name="head"))
    return b.model()


def c2f():
    """YOLOv8's C2f: Conv -> Split in halves -> bottleneck on the second half (residual) ->
    Concat of both halves and the bottleneck's output -> Conv."""
    b = CoupledBuilder()
    x = b.relu(b.conv("input", 12, name="cv1"))
    y0, y1 = b.split(x, [4, 8])
    z = b.relu(b.conv(b.relu(b.conv(y1, 8, name="m_a")), 8, name="m_b"))
    y2 = b.add(z, y1)
    b.output(b.conv(b.concat([y0, y1, y2]), 6, name="cv2"))
    return b.model()


def densenet():
    """DenseNet growth: each layer's output is concatenated onto the running stack."""
    b = CoupledBuilder()
    x = b.relu(b.conv("input", 6, name="stem"))
    for i in range(2):
        x = b.concat([x, b.relu(b.bn(b.conv(x, 4, name=f"grow{i}")))])
    b.output(b.conv(x, 4, name="transition"))
    return b.model()


def depthwise_stack():
    """MobileNet: expand 1×1 -> depthwise 3×3 -> project 1×1, twice, BN after each."""
    b = CoupledBuilder()
    x = b.relu(b.bn(b.conv("input", 8, name="stem", bias=False)))
    for i in range(2):
        y = b.relu(b.bn(b.conv(x, 16, k=1, name=f"expand{i}")))
        y = b.relu(b.bn(b.conv(y, 16, group=16, name=f"dw{i}")))
        x = b.add(b.bn(b.conv(y, 8, k=1, name=f"project{i}")), x)
    b.output(b.conv(x, 4, name="head"))
    return b.model()


def transposes():
    """A Transpose that keeps the channel axis (H<->W) and an NHWC round trip."""
    b = CoupledBuilder()
    x = b.transpose(b.relu(b.conv("input", 8, name="kept")), (0, 1, 3, 2))
    y = b.relu(b.conv(x, 8, name="detour"))
    y = b.transpose(b.relu(b.transpose(y, (0, 2, 3, 1))), (0, 3, 1, 2))
    b.output(b.conv(y, 4, name="head"))
    return b.model()


def flatten_heads():
    """GAP -> Flatten -> Gemm, and a 2×2 map flattened straight into a Gemm (and a MatMul)."""
    b = CoupledBuilder()
    x = b.relu(b.conv("input", 8, name="stem"))
    b.output(b.gemm(b.gap_flatten(x), 5))
    small = b.op("MaxPool", [b.relu(b.conv(x, 6, name="to_map"))], (6, 2, 2), kernel_shape=[4, 4], strides=[4, 4])
    flat = b.op("Flatten", [small], (24,), axis=1)
    b.output(b.gemm(flat, 3))
    b.output(b.op("MatMul", [flat, b.const(b.rng.standard_normal((24, 2)))], (2,)))
    return b.model()


def reshape_head():
    """A 2×2 map reshaped to [N, C·H·W] with a literal width, then a Gemm."""
    b = CoupledBuilder()
    x = b.op("MaxPool", [b.relu(b.conv("input", 8, name="stem"))], (8, 2, 2), kernel_shape=[4, 4], strides=[4, 4])
    flat = b.op("Reshape", [x, b.const([-1, 32], np.int64, "shape")], (32,))
    b.output(b.gemm(flat, 3))
    return b.model()


def deconv():
    b = CoupledBuilder()
    x = b.relu(b.conv("input", 8, name="stem"))
    y = b.relu(b.conv_transpose(x, 6, name="up"))
    b.output(b.conv(y, 4, name="head"))
    return b.model()


def spatial_ops():
    """Pad and Resize on spatial axes (scales and sizes), PRelu, BN and a per-channel Add."""
    b = CoupledBuilder(opset=18)
    x = b.relu(b.conv("input", 8, name="stem"))
    c, h, w = b.shape[x]
    x = b.op("Pad", [x, b.const([0, 0, 1, 1, 0, 0, 1, 1], np.int64)], (c, h + 2, w + 2), mode="reflect")
    x = b.op("Resize", [x, "", b.const([1, 1, 2, 2])], (c, 2 * h + 4, 2 * w + 4), mode="nearest")
    x = b.prelu(b.bn(b.add_channel_const(b.conv(x, 6, name="mid"))))
    x = b.op("Resize", [x, "", "", b.const([2, 6, h, w], np.int64)], (6, h, w), mode="linear")
    b.output(b.conv(x, 4, name="head"))
    return b.model()


def channel_ranges():
    """Slices (one from a negative start to past the end) and a Gather of contiguous channel
    ranges, and a Gather that reorders (frozen)."""
    b = CoupledBuilder()
    x = b.relu(b.conv("input", 12, name="stem"))
    lo = b.slice_channels(x, 0, 4)
    mid = b.op("Gather", [x, b.const([4, 5, 6, 7], np.int64)], (4, 8, 8), axis=1)
    hi = b.slice_channels(x, -4, 2**62)
    parts = [b.conv(lo, 6, name="lo"), b.conv(mid, 6, name="mid"), b.conv(hi, 6, name="hi")]
    y = b.relu(b.conv(b.concat(parts), 6, name="mix"))
    shuffled = b.op("Gather", [y, b.const([1, 0, 2, 3, 4, 5], np.int64)], (6, 8, 8), axis=1)
    b.output(b.conv(shuffled, 4, name="head"))
    return b.model()


def frozen_ops():
    """A Softmax over channels, a grouped Conv and a mid-stream graph output, each between
    prunable layers."""
    b = CoupledBuilder()
    x = b.relu(b.conv("input", 8, name="stem"))
    y = b.op("Softmax", [b.conv(x, 8, name="to_softmax")], (8, 8, 8), name="attn", axis=1)
    z = b.conv(b.relu(b.conv(y, 8, name="after_softmax")), 8, group=2, name="grouped")
    mid = b.relu(b.conv(z, 6, name="exposed"))
    b.output(mid)
    b.output(b.conv(mid, 4, name="head"))
    return b.model()


def custom_domain():
    """A node of a custom domain between two Convs (analysis only: ORT cannot run it)."""
    b = CoupledBuilder()
    x = b.relu(b.conv("input", 8, name="stem"))
    out = "mystery_out"
    b.nodes.append(helper.make_node("Mystery", [x], [out], name="mystery", domain="com.example"))
    b.shape[out] = b.shape[x]
    b.output(b.conv(out, 4, name="head"))
    graph = helper.make_graph(b.nodes, "t", [b.input],
                              [helper.make_tensor_value_info(b.outputs[0], 1, ["N", 4, 8, 8])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    model.ir_version = 8
    return model


def mixed():
    """Residual stream + SE + Concat: the graph of the property test."""
    b = CoupledBuilder()
    x = b.relu(b.conv("input", 8, name="stem"))
    y = b.relu(b.conv(x, 6, name="ba"))
    x = b.relu(b.add(b.bn(b.conv(y, 8, name="bb")), x))
    x = b.se_conv(x, 4)
    side = b.relu(b.conv(x, 4, name="side"))
    x = b.concat([x, side])
    b.output(b.gemm(b.gap_flatten(b.relu(b.conv(x, 6, name="head"))), 3))
    return b.model()


PATTERNS = {
    "residual_chain": residual_chain, "se_conv": se_block,
    "se_reduce_mean_hardsigmoid": lambda: se_block("HardSigmoid", reduce_mean=True), "se_gemm": se_gemm_block,
    "c2f": c2f, "densenet": densenet, "depthwise_stack": depthwise_stack, "transposes": transposes,
    "flatten_heads": flatten_heads, "reshape_head": reshape_head, "deconv": deconv, "spatial_ops": spatial_ops,
    "channel_ranges": channel_ranges, "frozen_ops": frozen_ops, "mixed": mixed,
}
