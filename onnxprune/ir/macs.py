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
from .shape_facts import inferred_at_batch_one, static_shapes  # noqa: F401  (their home before shape_facts)
from .shape_facts import static_shapes_at_batch_one


def count_params(model: onnx.ModelProto) -> int:
    total = 0
    for init in model.graph.initializer:
        if onnx.helper.tensor_dtype_to_np_dtype(init.data_type).kind == "f":
            total += int(np.prod(init.dims, dtype=np.int64))
    return total


def count_macs(model: onnx.ModelProto, shapes=None) -> tuple[int, dict[str, int]]:
    """(total MACs, MACs per counted node name) at ``shape_facts.static_shapes_at_batch_one``'s
    shapes (inferred once per model version)."""
    shapes = static_shapes_at_batch_one(model, shapes)
    per_node = {}
    for node in model.graph.node:
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
