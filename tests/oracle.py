"""Independent references the tests compare the library against."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def feeds_for(model: onnx.ModelProto, batch=2, seed=1) -> dict:
    rng = np.random.default_rng(seed)
    inp = model.graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") else batch for d in inp.type.tensor_type.shape.dim]
    return {inp.name: rng.standard_normal(dims).astype(np.float32)}


def rel_diff(a: list, b: list) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        assert x.shape == y.shape
        worst = max(worst, float(np.max(np.abs(x - y)) / max(np.max(np.abs(x)), 1e-12)))
    return worst


def zero_pruned_kernels(model: onnx.ModelProto, plan_layers) -> onnx.ModelProto:
    """The *original* model (BN and all) with W[o, c] = 0 wherever the plan drops channel c for o.

    Written from the plan's plain data: filter_order and kept_in_channels alone.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    convs = {n.name: n for n in out.graph.node if n.op_type == "Conv"}
    for layer in plan_layers:
        weight_name = convs[layer.node].input[1]
        tensor = _find_tensor(out, weight_name)
        w = numpy_helper.to_array(tensor).copy()
        per_group = layer.c_out // layer.groups
        for position, filt in enumerate(layer.filter_order):
            keep = set(layer.kept_in_channels[position // per_group])
            for c in range(layer.c_in):
                if c not in keep:
                    w[filt, c] = 0.0
        tensor.CopyFrom(numpy_helper.from_array(w, tensor.name))
    return out


def _find_tensor(model, name):
    for init in model.graph.initializer:
        if init.name == name:
            return init
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return node.attribute[0].t
    raise KeyError(name)
