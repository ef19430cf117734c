"""Which layers calibration refits, in which order, and against which target.

Why a module of its own: ``calibrate`` runs the refit; *what* it refits is a separate set of
graph rules — the planned layers in graph order, the dense layers after them that are refit to
absorb the error arriving from upstream, the residual partner whose error a Conv feeding an
``Add`` must cancel, layers whose disjoint groups must keep their partition, and the masked
working copy the pruned stream runs on. The sensitivity measurement reads the same bias rule.
"""

from __future__ import annotations

import numpy as np
import onnx

from .calib_stream import node_reads
from ..errors import UserError
from ..ir.graph import GraphIndex, get_attr, set_initializer
from ..planning.plan import LayerPlan, Plan
from ..checks.verify import PLANNED_OPS, masked_weight


def is_disjoint(layer: LayerPlan) -> bool:
    """True when the groups keep pairwise disjoint input channels (the speed planner's disjoint
    groups). Such a layer needs no Gather, only a channel order its producer can absorb; a
    data-aware choice per group could make two groups share a channel and bring the Gather back,
    so these layers keep their partition and are only refit."""
    kept = [c for group in layer.kept_in_channels for c in group]
    return layer.groups > 1 and len(set(kept)) == len(kept)


def dense_followers(model: onnx.ModelProto, layers) -> list[tuple[int, onnx.NodeProto, LayerPlan]]:
    """Layers the plan leaves dense but that read pruned layers' (inexact) outputs: Convs with
    group=1 and a constant 4-D weight, and Gemm heads (``Y = X·Wᵀ + b`` or ``X·W + b``), after
    the first planned Conv. Each gets a one-group, keep-everything ``LayerPlan`` (not part of the
    plan: the rewrite leaves them as they are).

    Why: the error a pruned layer leaves behind reaches every later layer; refitting the dense
    ones too, from the pruned model's inputs to the original's outputs, corrects it where it
    arrives instead of letting it compound, and the classifier head, refit last, absorbs what
    is left. The original weights stay feasible, so no layer's calibration error gets worse.
    """
    if not layers:
        return []
    first = min(position for position, _, _ in layers)
    planned = {node.name for _, node, _ in layers}
    index = GraphIndex(model.graph)
    found = []
    for position, node in enumerate(model.graph.node):
        if position <= first or node.name in planned or len(node.input) < 2:
            continue
        weight = index.constant(node.input[1])
        if weight is None or index.use_count(node.input[1]) > 1 or weight.dtype != np.float32:
            continue
        bias = bias_name(node)
        if bias and (index.constant(bias) is None or index.use_count(bias) > 1):
            continue
        if node.op_type == "Conv" and weight.ndim == 4 and get_attr(node, "group", 1) == 1:
            c_out, c_in, kh, kw = weight.shape
        elif refittable_gemm(node, weight, index):
            c_out, c_in, kh, kw = gemm_as_conv_weight(node, weight).shape
        else:
            continue
        found.append((position, node, LayerPlan(node.name, node.input[1], int(c_out), int(c_in), [int(kh), int(kw)],
                                                1, list(range(c_out)), [list(range(c_in))])))
    return found


def residual_partners(model: onnx.ModelProto, layers) -> dict[str, str]:
    """{Conv name: the other operand of the residual Add it feeds}, where that operand is computed
    before the Conv (so both streams hold it when the Conv is refit).

    Why: a Conv whose only reader is ``Add(conv, skip)`` matters downstream only through the sum.
    In the pruned model the skip tensor carries the error of every block before it, so fitting
    the Conv to ``conv_orig + skip_orig − skip_pruned`` makes the *sum* match the original, not
    just the branch — the multi-branch rule of He et al. 2017 (channel pruning, §3.3). The
    original kernels stay feasible, so the refit can only get closer to that target.
    """
    produced_at = {name: i for i, node in enumerate(model.graph.node) for name in node.output if name}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node_reads(node):
            readers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in model.graph.output}
    partners = {}
    for position, node, _ in layers:
        out = node.output[0]
        users = readers.get(out, [])
        if out in graph_outputs or len(users) != 1 or users[0].op_type != "Add" or len(users[0].input) != 2:
            continue
        other = [name for name in users[0].input if name != out]
        if len(other) != 1 or produced_at.get(other[0], -1) >= position:
            continue  # x + x, or a skip operand computed after this Conv
        partners[node.name] = other[0]
    return partners


def ordered_layers(model: onnx.ModelProto, plan: Plan) -> list[tuple[int, onnx.NodeProto, LayerPlan]]:
    """(node position, Conv node, layer plan) for each planned Conv, in graph order."""
    by_node = plan.by_node()
    found = [(i, node, by_node[node.name]) for i, node in enumerate(model.graph.node)
             if node.op_type in PLANNED_OPS and node.name in by_node]
    missing = set(by_node) - {node.name for _, node, _ in found}
    if missing:
        raise UserError(f"plan names Conv nodes not in this model: {', '.join(sorted(missing)[:5])}")
    return found


def masked_copy(model: onnx.ModelProto, layers) -> tuple[onnx.ModelProto, dict]:
    """Copy of ``model`` with each planned Conv's pruned kernels zeroed.

    Convs whose weight another node also reads are left as they are and not refit (refitting
    a shared initializer for one reader would change the other); returned as ``skipped``.
    """
    work = onnx.ModelProto()
    work.CopyFrom(model)
    index = GraphIndex(work.graph)
    skipped = {}
    for _, node, layer in layers:
        if index.use_count(node.input[1]) > 1:
            skipped[node.name] = f"weight {node.input[1]!r} is shared with another node"
            continue
        set_initializer(work.graph, node.input[1], masked_weight(node, index.constant(node.input[1]), layer))
    return work, skipped


def bias_name(node: onnx.NodeProto) -> str:
    return node.input[2] if len(node.input) > 2 and node.input[2] else ""


def layer_bias(index: GraphIndex, node: onnx.NodeProto, c_out: int, dtype) -> np.ndarray:
    """The layer's bias (input 2), zeros when it has none."""
    name = bias_name(node)
    return index.constant(name) if name else np.zeros(c_out, dtype=dtype)


def refittable_gemm(node: onnx.NodeProto, weight: np.ndarray | None, index: GraphIndex) -> bool:
    """``Y = X·W + b`` or ``X·Wᵀ + b`` with a constant 2-D W, no transA, unit alpha/beta and no bias
    or a constant one per output: calibration refits it as a 1×1 Conv (``calibrate.refit_gemm``);
    a bias broadcast from [1, N] or [1] has no per-output value to refit."""
    if not (node.op_type == "Gemm" and weight is not None and weight.ndim == 2 and get_attr(node, "transA", 0) == 0
            and get_attr(node, "alpha", 1.0) == 1.0 and get_attr(node, "beta", 1.0) == 1.0):
        return False
    bias = bias_name(node)
    if not bias:
        return True
    value = index.constant(bias)
    return value is not None and value.shape == (gemm_as_conv_weight(node, weight).shape[0],)


def gemm_as_conv_weight(node: onnx.NodeProto, weight: np.ndarray) -> np.ndarray:
    """A Gemm's weight as a 1×1 Conv's: [outputs, features, 1, 1] (W is [features, outputs]
    unless ``transB``)."""
    return (weight if get_attr(node, "transB", 0) else weight.T)[:, :, None, None]
