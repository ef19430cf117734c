"""Builders for the small synthetic CNN graphs the tests prune.

Each builder tracks channel counts, spatial sizes and an independent MAC count, so tests can
check the report against arithmetic done here rather than by the library.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_FOR_OPSET = {11: 6, 13: 7, 17: 8, 18: 8}


class GraphBuilder:
    def __init__(self, channels=3, size=16, opset=17, batch="N", seed=0, constant_weights=False):
        self.rng = np.random.default_rng(seed)
        self.opset = opset
        self.constant_weights = constant_weights
        self.nodes, self.inits, self.outputs = [], [], []
        self.shape = {}  # tensor -> (C, H, W) or (C,) after flatten
        self.conv_macs = {}  # conv name -> (macs per input channel, c_in)
        self.other_macs = 0
        self.counter = 0
        self.input = helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, channels, size, size])
        self.shape["input"] = (channels, size, size)

    def _name(self, base):
        self.counter += 1
        return f"{base}{self.counter}"

    def _const(self, name, value, dtype=np.float32):
        value = np.asarray(value, dtype=dtype)
        if self.constant_weights:
            self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name)))
        else:
            self.inits.append(numpy_helper.from_array(value, name))
        return name

    def conv(self, x, c_out, k=3, stride=1, bias=True, group=1, name=None):
        c_in, h, w = self.shape[x]
        name = name or self._name("conv")
        weight = self.rng.standard_normal((c_out, c_in // group, k, k)) * np.sqrt(2.0 / (c_in // group * k * k))
        inputs = [x, self._const(f"{name}.weight", weight)]
        if bias:
            inputs.append(self._const(f"{name}.bias", self.rng.standard_normal(c_out) * 0.1))
        out = f"{name}_out"
        pad = k // 2
        self.nodes.append(helper.make_node("Conv", inputs, [out], name=name, kernel_shape=[k, k],
                                           pads=[pad] * 4, strides=[stride, stride], group=group))
        ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
        self.shape[out] = (c_out, ho, wo)
        self.conv_macs[name] = (c_out * ho * wo * k * k, c_in // group)
        return out

    def bn(self, x):
        c = self.shape[x][0]
        name = self._name("bn")
        params = [self._const(f"{name}.{p}", v) for p, v in (
            ("scale", self.rng.uniform(0.5, 1.5, c)), ("bias", self.rng.standard_normal(c) * 0.1),
            ("mean", self.rng.standard_normal(c) * 0.1), ("var", self.rng.uniform(0.5, 1.5, c)))]
        return self._op("BatchNormalization", [x] + params, name, epsilon=1e-5)

    def _op(self, op, inputs, name=None, shape_from=0, **attrs):
        name = name or self._name(op.lower())
        out = f"{name}_out"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        self.shape[out] = self.shape[inputs[shape_from]]
        return out

    def relu(self, x):
        return self._op("Relu", [x])

    def add(self, a, b):
        return self._op("Add", [a, b])

    def mul_const(self, x):
        c = self.shape[x][0]
        return self._op("Mul", [x, self._const(self._name("scale"), self.rng.uniform(0.5, 1.5, (c, 1, 1)))])

    def maxpool(self, x):
        out = self._op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
        c, h, w = self.shape[x]
        self.shape[out] = (c, h // 2, w // 2)
        return out

    def concat(self, xs):
        out = self._op("Concat", xs, axis=1)
        c = sum(self.shape[x][0] for x in xs)
        self.shape[out] = (c,) + self.shape[xs[0]][1:]
        return out

    def gap_flatten(self, x):
        pooled = self._op("GlobalAveragePool", [x])
        self.shape[pooled] = (self.shape[x][0], 1, 1)
        flat = self._op("Flatten", [pooled], axis=1)
        self.shape[flat] = (self.shape[x][0],)
        return flat

    def gemm(self, x, n_out):
        n_in = self.shape[x][0]
        name = self._name("fc")
        w = self._const(f"{name}.weight", self.rng.standard_normal((n_out, n_in)) / np.sqrt(n_in))
        b = self._const(f"{name}.bias", self.rng.standard_normal(n_out) * 0.1)
        out = self._op("Gemm", [x, w, b], name, transB=1)
        self.shape[out] = (n_out,)
        self.other_macs += n_in * n_out
        return out

    def output(self, x):
        self.outputs.append(x)

    def model(self):
        batch = self.input.type.tensor_type.shape.dim[0]
        batch = batch.dim_param or batch.dim_value
        outs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [batch, *self.shape[x]]) for x in self.outputs]
        graph = helper.make_graph(self.nodes, "test", [self.input], outs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = IR_FOR_OPSET[self.opset]
        onnx.checker.check_model(model, full_check=True)
        return model

    def macs(self, pruned_layers=None):
        """MACs at batch 1; ``pruned_layers``: conv name -> kept input channels per group."""
        pruned_layers = pruned_layers or {}
        total = self.other_macs
        for name, (per_channel, c_in) in self.conv_macs.items():
            total += per_channel * pruned_layers.get(name, c_in)
        return total


# --- the graph families the core must handle ---------------------------------------------

def vgg(**kw):
    b = GraphBuilder(**kw)
    x = b.relu(b.conv("input", 32))
    x = b.maxpool(b.relu(b.conv(x, 32)))
    x = b.relu(b.conv(x, 64))
    b.output(b.conv(x, 32))
    return b


def resnet_basic(bn=True, **kw):
    """Stem, an identity basic block, a stride-2 block with a 1x1 projection shortcut, GAP+Gemm."""
    b = GraphBuilder(**kw)
    norm = b.bn if bn else (lambda t: t)
    x = b.relu(norm(b.conv("input", 16, bias=not bn)))
    y = b.relu(norm(b.conv(x, 16, bias=not bn)))
    y = norm(b.conv(y, 16, bias=not bn))
    x = b.relu(b.add(y, x))
    y = b.relu(norm(b.conv(x, 32, stride=2, bias=not bn)))
    y = norm(b.conv(y, 32, bias=not bn))
    shortcut = norm(b.conv(x, 32, k=1, stride=2, bias=not bn))
    x = b.relu(b.add(y, shortcut))
    b.output(b.gemm(b.gap_flatten(x), 10))
    return b


def bottleneck(**kw):
    b = GraphBuilder(**kw)
    x = b.relu(b.bn(b.conv("input", 64, bias=False)))
    y = b.relu(b.bn(b.conv(x, 16, k=1, bias=False)))
    y = b.relu(b.bn(b.conv(y, 16, bias=False)))
    y = b.bn(b.conv(y, 64, k=1, bias=False))
    x = b.relu(b.add(y, x))
    b.output(b.gemm(b.gap_flatten(x), 10))
    return b


def fan_out(**kw):
    """One tensor feeds two Convs and an Add."""
    b = GraphBuilder(**kw)
    x = b.relu(b.conv("input", 32))
    t = b.relu(b.conv(x, 32))
    left, right = b.conv(t, 32), b.conv(t, 32)
    y = b.add(b.add(left, right), t)
    b.output(b.conv(b.relu(y), 16))
    return b


def concat_branches(**kw):
    """Inception/DenseNet style: branches concatenated, then a Conv over the concat."""
    b = GraphBuilder(**kw)
    x = b.relu(b.conv("input", 32))
    branch1 = b.relu(b.conv(x, 16, k=1))
    branch2 = b.relu(b.conv(b.relu(b.conv(x, 16, k=1)), 32))
    y = b.concat([branch1, branch2, x])
    b.output(b.gap_flatten(b.relu(b.conv(y, 32))))
    return b


def depthwise_separable(**kw):
    b = GraphBuilder(**kw)
    x = b.relu(b.bn(b.conv("input", 32, bias=False)))
    x = b.relu(b.bn(b.conv(x, 32, group=32, bias=False)))  # depthwise: skipped
    x = b.relu(b.bn(b.conv(x, 64, k=1, bias=False)))  # pointwise: pruned
    x = b.relu(b.bn(b.conv(x, 64, group=64, bias=False)))
    x = b.mul_const(b.conv(x, 32, k=1))
    b.output(b.gemm(b.gap_flatten(x), 10))
    return b


def inverted_residual(**kw):
    """MobileNetV2's block: expand 1×1 -> depthwise 3×3 -> linear project 1×1, residual Add."""
    b = GraphBuilder(**kw)
    x = b.relu(b.bn(b.conv("input", 32, bias=False)))
    y = b.relu(b.bn(b.conv(x, 96, k=1, bias=False)))  # expand
    y = b.relu(b.bn(b.conv(y, 96, group=96, bias=False)))  # depthwise
    y = b.bn(b.conv(y, 32, k=1, bias=False))  # project: pruning its inputs narrows the whole chain
    x = b.add(y, x)
    b.output(b.gemm(b.gap_flatten(x), 10))
    return b


FAMILIES = {
    "vgg": vgg, "resnet_basic": resnet_basic, "resnet_basic_folded": lambda **kw: resnet_basic(bn=False, **kw),
    "bottleneck": bottleneck, "fan_out": fan_out, "concat": concat_branches,
    "depthwise_separable": depthwise_separable, "inverted_residual": inverted_residual,
}


def reduce_mean_head(**kw):
    """The dynamo exporter's head: ReduceMean(keepdims) -> Reshape -> Gemm."""
    b = GraphBuilder(**kw)
    x = b.relu(b.conv("input", 32))
    x = b.relu(b.conv(x, 32))
    x = b.relu(b.conv(x, 32))
    if b.opset >= 18:
        axes = b._const("axes", [2, 3], dtype=np.int64)
        pooled = b._op("ReduceMean", [x, axes], keepdims=1)
    else:
        pooled = b._op("ReduceMean", [x], axes=[2, 3], keepdims=1)
    b.shape[pooled] = (32, 1, 1)
    shape = b._name("shape")
    b.inits.append(numpy_helper.from_array(np.array([-1, 32], dtype=np.int64), shape))
    flat = b._op("Reshape", [pooled, shape])
    b.shape[flat] = (32,)
    b.output(b.gemm(flat, 10))
    return b


FAMILIES["reduce_mean_head"] = reduce_mean_head
