"""The ONNX ops the torch bridge evaluates: one ``torch`` implementation per op (``SUPPORTED_OPS``).

Why separate from ``torch_bridge.py``: the bridge decides *what* runs (which initializers are
parameters, the node order, which Gather + grouped Conv pairs fuse, how trained values are
written back); this table only says how one node computes its outputs from its inputs, so an
op is added or fixed here without reading the interpreter, and the interpreter stays short.

Rules:
- every op is ``op(module, inputs, attributes, node)`` and returns a tensor or a tuple of them
  (one per node output); ``module`` is read only for its ``opset`` (attribute- vs input-form
  arguments); an input the node leaves empty is None;
- an op raises ``UnsupportedModel`` naming the node for what it cannot evaluate exactly
  (the bridge reports any other exception the same way, with the node's name);
- values are computed in float32 (float16/float64 constants and Casts to them read as float32);
  ONNX padding torch has no argument for (asymmetric pads, ``auto_pad``) is an explicit ``F.pad``;
- ``Constant`` is listed without an implementation: the bridge folds it into a frozen tensor
  when the module is built.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - exercised only without torch
    torch = None
    F = None


class UnsupportedModel(Exception):
    """The graph holds something the torch bridge cannot evaluate; the message says what."""


def _to_torch(value: np.ndarray):
    value = np.asarray(value)
    if value.dtype == np.float64 or value.dtype == np.float16:
        value = value.astype(np.float32)
    return torch.from_numpy(np.array(value))  # own copy, writable


def _constant_value(node, attrs):
    if "value" in attrs:
        return _to_torch(numpy_helper.to_array(attrs["value"]))
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in attrs:
            return _to_torch(np.asarray(attrs[key], dtype=dtype))
    raise UnsupportedModel(f"Constant {node.name!r}: unsupported value attribute {sorted(attrs)}")


def _ints(t) -> list[int]:
    return [int(v) for v in (t.tolist() if isinstance(t, torch.Tensor) else t)]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _torch_pad(begins: list[int], ends: list[int]) -> list[int]:
    """ONNX per-axis (begin, end) pads -> F.pad's last-axis-first list, trimmed of leading zero axes."""
    rank = len(begins)
    first = next((i for i in range(rank) if begins[i] or ends[i]), rank)
    pad = []
    for i in reversed(range(first, rank)):
        pad += [begins[i], ends[i]]
    return pad


def _spatial_pads(x, attrs, kernel, strides, dilations) -> tuple[list[int], list[int]]:
    spatial = x.dim() - 2
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("NOTSET", ""):
        pads = list(attrs.get("pads", [0] * (2 * spatial)))
        return pads[:spatial], pads[spatial:]
    if auto_pad == "VALID":
        return [0] * spatial, [0] * spatial
    begins, ends = [], []
    for i in range(spatial):
        size = x.shape[2 + i]
        out = math.ceil(size / strides[i])
        total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
        small = total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else total - small)
        ends.append(total - begins[-1])
    return begins, ends


# -- ops: each takes (module, inputs, attributes, node) -------------------------------------

def _conv(m, a, attrs, node):
    x, w = a[0], a[1]
    b = a[2] if len(a) > 2 else None
    spatial = w.dim() - 2
    if spatial not in (1, 2, 3):
        raise UnsupportedModel(f"Conv {node.name!r} with {spatial} spatial dims")
    kernel = list(attrs.get("kernel_shape", w.shape[2:]))
    strides = list(attrs.get("strides", [1] * spatial))
    dilations = list(attrs.get("dilations", [1] * spatial))
    begins, ends = _spatial_pads(x, attrs, kernel, strides, dilations)
    padding = begins
    if begins != ends:
        x = F.pad(x, _torch_pad([0, 0] + begins, [0, 0] + ends))
        padding = [0] * spatial
    fn = (F.conv1d, F.conv2d, F.conv3d)[spatial - 1]
    return fn(x, w, b, stride=strides, padding=padding, dilation=dilations, groups=int(attrs.get("group", 1)))


def _make_scattered_conv(indices, group: int):
    """Conv op computing a grouped Conv as a dense one (see ``torch_bridge.OnnxModule._fuse_gather_grouped_convs``).

    ``indices``: the fused Gather's channel indices (the op then receives the Gather's source),
    or None for a plain block-diagonal expansion of the grouped weight.
    """
    cache = {}

    def selection(per_group: int, channels: int, dtype):
        key = (channels, dtype)
        if key not in cache:
            if indices is None:
                rows = torch.arange(group * per_group)
            else:
                rows = torch.where(indices < 0, indices + channels, indices).long()
            select = torch.zeros(group * per_group, channels, dtype=dtype)
            select[torch.arange(group * per_group), rows] = 1.0
            cache[key] = select.reshape(group, per_group, channels)
        return cache[key]

    def op(m, a, attrs, node):
        x, w = a[0], a[1]
        c_out, per_group = w.shape[0], w.shape[1]
        grouped = w.reshape(group, c_out // group, per_group, -1)
        dense = torch.einsum("gojk,gjc->gock", grouped, selection(per_group, x.shape[1], w.dtype))
        dense = dense.reshape((c_out, x.shape[1]) + tuple(w.shape[2:]))
        return _conv(m, [x, dense] + list(a[2:]), {**attrs, "group": 1}, node)

    return op


def _pool(m, a, attrs, node):
    x = a[0]
    if len(node.output) > 1 and node.output[1]:
        raise UnsupportedModel(f"{node.op_type} {node.name!r}: the Indices output is not supported")
    spatial = x.dim() - 2
    kernel = list(attrs["kernel_shape"])
    strides = list(attrs.get("strides", [1] * spatial))
    dilations = list(attrs.get("dilations", [1] * spatial))
    begins, ends = _spatial_pads(x, attrs, kernel, strides, dilations)
    ceil = bool(attrs.get("ceil_mode", 0))
    is_max = node.op_type == "MaxPool"
    symmetric = begins == ends and all(2 * p <= k for p, k in zip(begins, kernel))
    padding = begins
    if not symmetric:
        if not is_max and not attrs.get("count_include_pad", 0):
            raise UnsupportedModel(f"AveragePool {node.name!r}: asymmetric pads without count_include_pad")
        x = F.pad(x, _torch_pad([0, 0] + begins, [0, 0] + ends), value=-math.inf if is_max else 0.0)
        padding = [0] * spatial
    if is_max:
        fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[spatial - 1]
        return fn(x, kernel, strides, padding, dilations, ceil_mode=ceil)
    if any(d != 1 for d in dilations):
        raise UnsupportedModel(f"AveragePool {node.name!r}: dilations are not supported")
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[spatial - 1]
    return fn(x, kernel, strides, padding, ceil_mode=ceil, count_include_pad=bool(attrs.get("count_include_pad", 0)))


def _gather(m, a, attrs, node):
    data, idx = a[0], a[1].long()
    axis = _axis(int(attrs.get("axis", 0)), data.dim())
    size = data.shape[axis]
    idx = torch.where(idx < 0, idx + size, idx)
    out = torch.index_select(data, axis, idx.reshape(-1))
    return out.reshape(tuple(data.shape[:axis]) + tuple(idx.shape) + tuple(data.shape[axis + 1:]))


def _clip(m, a, attrs, node):
    if m.opset < 11:
        low, high = attrs.get("min"), attrs.get("max")
    else:
        low = float(a[1]) if len(a) > 1 and a[1] is not None else None
        high = float(a[2]) if len(a) > 2 and a[2] is not None else None
    if low is not None and high is not None and low < high:
        # hardtanh's backward is one fused kernel; clamp's is several (ReLU6 layers were 1/5 of a
        # MobileNetV2 training step). Same values; the gradients differ only at the bounds exactly.
        return F.hardtanh(a[0], low, high)
    return torch.clamp(a[0], min=low, max=high)


def _div(m, a, attrs, node):
    x, y = a
    if not x.is_floating_point() and not y.is_floating_point():
        return torch.div(x, y, rounding_mode="trunc")
    return x / y


def _pad(m, a, attrs, node):
    x = a[0]
    mode = attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if m.opset < 11:
        pads, value = list(attrs["pads"]), float(attrs.get("value", 0.0))
    else:
        pads = _ints(a[1])
        value = float(a[2]) if len(a) > 2 and a[2] is not None and a[2].numel() else 0.0
    rank = x.dim()
    if len(a) > 3 and a[3] is not None:  # axes (opset 18)
        axes = [_axis(v, rank) for v in _ints(a[3])]
        full = [0] * (2 * rank)
        for i, ax in enumerate(axes):
            full[ax], full[rank + ax] = pads[i], pads[len(axes) + i]
        pads = full
    pad = _torch_pad(pads[:rank], pads[rank:])
    if not pad:
        return x
    if mode == "constant":
        return F.pad(x, pad, value=value)
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if torch_mode is None or len(pad) // 2 > rank - 2:
        raise UnsupportedModel(f"Pad {node.name!r}: mode {mode!r} on these axes is not supported")
    return F.pad(x, pad, mode=torch_mode)


def _flatten(m, a, attrs, node):
    x = a[0]
    axis = _axis(int(attrs.get("axis", 1)), x.dim())
    return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)


def _gemm(m, a, attrs, node):
    x, w = a[0], a[1]
    if attrs.get("transA", 0):
        x = x.t()
    if attrs.get("transB", 0):
        w = w.t()
    y = float(attrs.get("alpha", 1.0)) * (x @ w)
    if len(a) > 2 and a[2] is not None:
        y = y + float(attrs.get("beta", 1.0)) * a[2]
    return y


def _reshape(m, a, attrs, node):
    x, shape = a[0], _ints(a[1])
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _axes_arg(m, a, attrs, since: int):
    if m.opset >= since:
        return _ints(a[1]) if len(a) > 1 and a[1] is not None else None
    return list(attrs["axes"]) if "axes" in attrs else None


def _reduce_mean(m, a, attrs, node):
    x = a[0]
    axes = _axes_arg(m, a, attrs, 18)
    keep = bool(attrs.get("keepdims", 1))
    if not axes:
        if attrs.get("noop_with_empty_axes", 0):
            return x
        axes = list(range(x.dim()))
    return x.mean(dim=[_axis(v, x.dim()) for v in axes], keepdim=keep)


def _batch_norm(m, a, attrs, node):
    if len(node.output) > 1 and any(node.output[1:]):
        raise UnsupportedModel(f"BatchNormalization {node.name!r} in training mode")
    x, scale, bias, mean, var = a[:5]
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=float(attrs.get("epsilon", 1e-5)))


def _softmax(m, a, attrs, node, log=False):
    x = a[0]
    fn = torch.log_softmax if log else torch.softmax
    if m.opset >= 13:
        return fn(x, dim=int(attrs.get("axis", -1)))
    axis = _axis(int(attrs.get("axis", 1)), x.dim())
    flat = x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)
    return fn(flat, dim=1).reshape(x.shape)


def _squeeze(m, a, attrs, node):
    x = a[0]
    axes = _axes_arg(m, a, attrs, 13)
    if axes is None:
        return x.squeeze()
    for ax in sorted((_axis(v, x.dim()) for v in axes), reverse=True):
        x = x.squeeze(ax)
    return x


def _unsqueeze(m, a, attrs, node):
    x = a[0]
    axes = _axes_arg(m, a, attrs, 13)
    rank = x.dim() + len(axes)
    for ax in sorted(_axis(v, rank) for v in axes):
        x = x.unsqueeze(ax)
    return x


def _shape(m, a, attrs, node):
    dims = list(a[0].shape)
    start, end = attrs.get("start", 0), attrs.get("end")
    return torch.tensor(dims[start:end], dtype=torch.int64)


_TORCH_DTYPES = {onnx.TensorProto.FLOAT: torch.float32 if torch else None,
                 onnx.TensorProto.DOUBLE: torch.float32 if torch else None,  # computed in fp32
                 onnx.TensorProto.FLOAT16: torch.float32 if torch else None,
                 onnx.TensorProto.INT64: torch.int64 if torch else None,
                 onnx.TensorProto.INT32: torch.int32 if torch else None,
                 onnx.TensorProto.BOOL: torch.bool if torch else None}


def _cast(m, a, attrs, node):
    dtype = _TORCH_DTYPES.get(int(attrs["to"]))
    if dtype is None:
        raise UnsupportedModel(f"Cast {node.name!r} to ONNX type {attrs['to']}")
    return a[0].to(dtype)


def _unary(fn):
    return lambda m, a, attrs, node: fn(a[0])


def _binary(fn):
    return lambda m, a, attrs, node: fn(a[0], a[1])


SUPPORTED_OPS = {
    "Conv": _conv,
    "Gather": _gather,
    "Relu": _unary(F.relu) if F else None,
    "Clip": _clip,
    "Add": _binary(torch.add) if torch else None,
    "Sub": _binary(torch.sub) if torch else None,
    "Mul": _binary(torch.mul) if torch else None,
    "Div": _div,
    "Pow": _binary(torch.pow) if torch else None,
    "Sqrt": _unary(torch.sqrt) if torch else None,
    "Pad": _pad,
    "GlobalAveragePool": lambda m, a, attrs, node: a[0].mean(dim=list(range(2, a[0].dim())), keepdim=True),
    "GlobalMaxPool": lambda m, a, attrs, node: a[0].amax(dim=list(range(2, a[0].dim())), keepdim=True),
    "Flatten": _flatten,
    "Gemm": _gemm,
    "MatMul": _binary(torch.matmul) if torch else None,
    "Reshape": _reshape,
    "Concat": lambda m, a, attrs, node: torch.cat([t for t in a if t is not None], dim=int(attrs["axis"])),
    "ReduceMean": _reduce_mean,
    "Sigmoid": _unary(torch.sigmoid) if torch else None,
    "Tanh": _unary(torch.tanh) if torch else None,
    "HardSigmoid": lambda m, a, attrs, node: torch.clamp(
        float(attrs.get("alpha", 0.2)) * a[0] + float(attrs.get("beta", 0.5)), 0.0, 1.0),
    "HardSwish": _unary(F.hardswish) if F else None,
    "LeakyRelu": lambda m, a, attrs, node: F.leaky_relu(a[0], float(attrs.get("alpha", 0.01))),
    "Softmax": _softmax,
    "LogSoftmax": lambda m, a, attrs, node: _softmax(m, a, attrs, node, log=True),
    "BatchNormalization": _batch_norm,
    "MaxPool": _pool,
    "AveragePool": _pool,
    "Identity": lambda m, a, attrs, node: a[0],
    "Dropout": lambda m, a, attrs, node: a[0],
    "Transpose": lambda m, a, attrs, node: a[0].permute(
        list(attrs.get("perm", list(reversed(range(a[0].dim())))))),
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Shape": _shape,
    "Cast": _cast,
    "Constant": None,  # folded into constants when the module is built
}
