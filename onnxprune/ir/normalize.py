"""Normalize a model so every prunable Conv carries its full effective weight.

Rules, applied in order:
0. IR < 4 models list every initializer as a graph input too (that IR has no other way to store
   a weight); ONNX Runtime treats them as constants there (only IR >= 4 lets an input override an
   initializer), so they are lifted: dropped from ``graph.input``, the IR version set to 4.
   ``relist_initializer_inputs`` puts the output back into the input's IR form.
1. Unnamed nodes get a deterministic name ``<OpType>_<index>`` (plans refer to nodes by name).
2. ``Constant`` nodes holding a tensor become initializers (weights may come either way); so does a
   ``ConstantOfShape`` of a constant shape that a Conv, Gemm or BatchNormalization reads as a parameter (the
   onnx package's own IR-3 test models make every weight that way; their Convs were skipped as
   "dynamic weight"). Only those: a large constant map read elsewhere would bloat the file.
3. A Conv whose output feeds exactly one node and is not a graph output absorbs that node when it
   is an inference ``BatchNormalization`` or a per-channel ``Mul``/``Div``/``Add``/``Sub`` by a
   constant (scalar or shape broadcasting only along channels). Repeats until nothing changes.
   The folded weight keeps its initializer name when no other node reads it, so training
   snapshots can still be matched by name.
4. Unused initializers are dropped.

Why: grouped-kernel selection and verification must see the weights the layer really applies;
a BN left behind would make the "pruned kernels zeroed" oracle and the kernel distances wrong.
"""

from __future__ import annotations

import numpy as np
import onnx

from .graph import GraphIndex, NameAllocator, get_attr, remove_unused_initializers, set_initializer

_FOLDABLE_ARITH = ("Mul", "Div", "Add", "Sub")


def normalize(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    lift_initializer_inputs(out)
    name_unnamed_nodes(graph)
    constants_to_initializers(graph)
    filled_weights_to_initializers(graph)
    while _fold_one(graph):
        pass
    remove_unused_initializers(graph)
    return out


INITIALIZERS_ARE_INPUTS_BELOW_IR = 4  # IR 3 and older: every initializer is also listed as a graph input


def lift_initializer_inputs(model: onnx.ModelProto) -> None:
    """Rule 0: an IR < 4 model's initializer-inputs become plain initializers (IR version 4)."""
    if model.ir_version >= INITIALIZERS_ARE_INPUTS_BELOW_IR:
        return
    weights = {t.name for t in model.graph.initializer}
    real = [vi for vi in model.graph.input if vi.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(real)
    model.ir_version = INITIALIZERS_ARE_INPUTS_BELOW_IR


def relist_initializer_inputs(model: onnx.ModelProto, ir_version: int) -> None:
    """Undo rule 0 on a model derived from an IR < 4 input: the IR version back to
    ``ir_version`` and every initializer (pruned weights, new Gather indices) listed as a graph
    input again, after the real inputs, with its current type and shape. Initializers dropped as
    unused lose their input entry with them, so no input becomes required that was not."""
    if ir_version >= INITIALIZERS_ARE_INPUTS_BELOW_IR:
        return
    weights = {t.name for t in model.graph.initializer}
    real = [vi for vi in model.graph.input if vi.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(real)
    model.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in model.graph.initializer)
    model.ir_version = ir_version


def name_unnamed_nodes(graph: onnx.GraphProto) -> None:
    taken = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if not node.name:
            name, k = f"{node.op_type}_{i}", 1
            while name in taken:
                name = f"{node.op_type}_{i}_{k}"
                k += 1
            node.name = name
            taken.add(name)


def constants_to_initializers(graph: onnx.GraphProto) -> None:
    keep = []
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            value = get_attr(node, "value")
            if isinstance(value, onnx.TensorProto):
                tensor = onnx.TensorProto()
                tensor.CopyFrom(value)
                tensor.name = node.output[0]
                graph.initializer.append(tensor)
                continue
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


PARAMETERS = {"Conv": slice(1, 3), "Gemm": slice(1, 3), "BatchNormalization": slice(1, 5)}  # op -> its parameters


def filled_weights_to_initializers(graph: onnx.GraphProto) -> None:
    """Rule 2's ``ConstantOfShape`` weights: the filled tensor becomes an initializer of the
    node's output name."""
    index = GraphIndex(graph)
    params = {name for node in graph.node if node.domain in ("", "ai.onnx") and node.op_type in PARAMETERS
              for name in node.input[PARAMETERS[node.op_type]] if name}
    keep = []
    for node in graph.node:
        shape = index.constant(node.input[0]) if node.op_type == "ConstantOfShape" and node.input else None
        if shape is not None and node.domain in ("", "ai.onnx") and node.output[0] in params:
            value = get_attr(node, "value")
            fill = onnx.numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else np.zeros(1, np.float32)
            dims = tuple(int(d) for d in shape.reshape(-1))
            graph.initializer.append(onnx.numpy_helper.from_array(
                np.full(dims, fill.reshape(-1)[0], dtype=fill.dtype), node.output[0]))
            continue
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def per_channel_vector(value: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """``value`` as a length-``channels`` vector if it broadcasts along axis 1 only, else None."""
    if value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + tuple(value.shape)
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(shape[1]), (channels,)).astype(np.float64)


def _conv_weight_and_bias(index: GraphIndex, conv: onnx.NodeProto):
    weight = index.constant(conv.input[1]) if len(conv.input) > 1 else None
    if weight is None or weight.dtype.kind != "f":
        return None, None
    bias = None
    if len(conv.input) > 2 and conv.input[2]:
        bias = index.constant(conv.input[2])
        if bias is None:
            return None, None
    return weight, bias


def _fold_one(graph: onnx.GraphProto) -> bool:
    """Fold one (Conv, follower) pair; return True if the graph changed."""
    index = GraphIndex(graph)
    for conv in graph.node:
        if conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx"):
            continue
        out = conv.output[0]
        if index.use_count(out) != 1 or not index.consumers.get(out):
            continue
        follower = index.consumers[out][0]
        weight, bias = _conv_weight_and_bias(index, conv)
        if weight is None:
            continue
        folded = _folded_affine(index, follower, out, weight.shape[0], weight.ndim)
        if folded is None:
            continue
        scale, shift = folded
        w = weight.astype(np.float64) * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
        b = (np.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64)) * scale + shift
        _write_conv_params(graph, index, conv, w.astype(weight.dtype), b.astype(weight.dtype))
        conv.output[0] = follower.output[0]
        graph.node.remove(follower)
        return True
    return False


def _folded_affine(index: GraphIndex, node: onnx.NodeProto, conv_out: str, channels: int, rank: int):
    """(scale, shift) per output channel that ``node`` applies to the conv output, or None."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "BatchNormalization":
        if get_attr(node, "training_mode", 0) or any(o for o in node.output[1:]):
            return None
        params = [index.constant(name) for name in node.input[1:5]]
        if node.input[0] != conv_out or any(p is None for p in params):
            return None
        gamma, beta, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
        if any(p.shape != (channels,) for p in (gamma, beta, mean, var)):
            return None
        scale = gamma / np.sqrt(var + get_attr(node, "epsilon", 1e-5))
        return scale, beta - mean * scale
    if node.op_type in _FOLDABLE_ARITH and len(node.input) == 2:
        if node.input[0] == conv_out:
            other = node.input[1]
        elif node.input[1] == conv_out and node.op_type in ("Mul", "Add"):  # commutative only
            other = node.input[0]
        else:
            return None
        value = index.constant(other)
        if value is None or value.dtype.kind != "f":
            return None
        vec = per_channel_vector(value, channels, rank)
        if vec is None:
            return None
        ones, zeros = np.ones(channels), np.zeros(channels)
        if node.op_type == "Mul":
            return vec, zeros
        if node.op_type == "Div":
            return (None if np.any(vec == 0) else (1.0 / vec, zeros))
        if node.op_type == "Add":
            return ones, vec
        return ones, -vec  # Sub with the conv output first
    return None


def _write_conv_params(graph, index: GraphIndex, conv, weight: np.ndarray, bias: np.ndarray) -> None:
    names = NameAllocator(graph)
    w_name = conv.input[1]
    if index.use_count(w_name) > 1:
        w_name = names.new(f"{conv.name}.weight")
    set_initializer(graph, w_name, weight)
    conv.input[1] = w_name
    b_name = conv.input[2] if len(conv.input) > 2 and conv.input[2] else ""
    if not b_name or index.use_count(b_name) > 1:
        b_name = names.new(f"{conv.name}.bias")
    set_initializer(graph, b_name, bias)
    while len(conv.input) < 3:
        conv.input.append("")
    conv.input[2] = b_name
