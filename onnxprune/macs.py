"""Multiply-accumulate and parameter counts, the numbers the report compares.

Rules: MACs count Conv, ConvTranspose, Gemm and MatMul at the model's static shapes, with a
symbolic batch set to 1 and other symbolic input dimensions set by ``shapes.py`` (the pipeline's
working shapes, else its default rule). Conv MACs = N·C_out·prod(out
spatial)·(C_in/group)·prod(kernel); Gemm/MatMul MACs = prod(output dims)·K. Params = elements of
all floating-point initializers (weights and biases; Gather indices are not parameters).
"""

from __future__ import annotations

import numpy as np
import onnx

from .graph import get_attr
from .shapes import with_input_shapes


def inferred_at_batch_one(model: onnx.ModelProto, shapes=None) -> onnx.ModelProto:
    """A copy at batch 1 and the input shapes ``shapes`` (``shapes.resolve_input_shapes``; None:
    resolved by its rules), with every static shape inferred."""
    fixed = with_input_shapes(model, shapes, batch=1)
    del fixed.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(fixed, data_prop=True)


def static_shapes(inferred: onnx.ModelProto) -> dict[str, list[int]]:
    """Fully static shapes by tensor name (initializers included) of an inferred model."""
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        ttype = vi.type.tensor_type
        if not ttype.HasField("shape"):  # rank unknown: not a scalar
            continue
        dims = ttype.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = [d.dim_value for d in dims]
    for init in inferred.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def count_params(model: onnx.ModelProto) -> int:
    total = 0
    for init in model.graph.initializer:
        if onnx.helper.tensor_dtype_to_np_dtype(init.data_type).kind == "f":
            total += int(np.prod(init.dims, dtype=np.int64))
    return total


def count_macs(model: onnx.ModelProto, shapes=None) -> tuple[int, dict[str, int]]:
    """(total MACs, MACs per counted node name) at ``inferred_at_batch_one``'s shapes."""
    inferred = inferred_at_batch_one(model, shapes)
    shapes = static_shapes(inferred)
    per_node = {}
    for node in inferred.graph.node:
        macs = _node_macs(node, shapes)
        if macs is not None:
            per_node[node.name or node.output[0]] = macs
    return sum(per_node.values()), per_node


def conv_macs(c_out: int, c_in_per_group: int, kernel, out_spatial, batch: int = 1) -> int:
    """MACs of a Conv: every output element (batch·C_out·prod(out spatial)) reads the
    ``C_in/group`` channels of its group over the kernel. The one formula the MACs count, the
    planners' candidates and the latency table's keys share."""
    return int(batch * c_out * c_in_per_group * np.prod(kernel, dtype=np.int64) * np.prod(out_spatial, dtype=np.int64))


def _node_macs(node: onnx.NodeProto, shapes: dict) -> int | None:
    op = node.op_type
    out = shapes.get(node.output[0])
    if op in ("Conv", "ConvTranspose"):
        w = shapes.get(node.input[1])
        x = shapes.get(node.input[0])
        if w is None or out is None or x is None:
            return None
        if op == "Conv":
            return conv_macs(out[1], w[1], w[2:], out[2:], batch=out[0])
        # ConvTranspose weight is [C_in, C_out/group, k...]: each input pixel meets w[1]·prod(k).
        return int(np.prod(x, dtype=np.int64) * np.prod(w[1:], dtype=np.int64))
    if op in ("Gemm", "MatMul"):
        a = shapes.get(node.input[0])
        if a is None or out is None:
            return None
        k = a[0] if (op == "Gemm" and get_attr(node, "transA", 0)) else a[-1]
        return int(np.prod(out, dtype=np.int64) * k)
    return None
