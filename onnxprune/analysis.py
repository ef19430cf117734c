"""Find the Convs grouped kernel pruning can rewrite, and say why the others are left dense.

A Conv is prunable when (rules checked in this order; the first failing one is the reason):
- it is not named by ``--exclude``;
- its weight is a float constant (initializer or folded Constant), 4-D (2-D convolution);
- ``group == 1`` (depthwise and already-grouped convs are left alone);
- it has at least ``min_channels`` input and output channels (tiny layers such as an RGB stem
  gain nothing and lose much);
- ``C_out`` is divisible by the number of groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from .graph import GraphIndex, get_attr


@dataclass(frozen=True)
class ConvInfo:
    name: str
    weight: str
    c_out: int
    c_in: int
    kernel: tuple[int, int]


@dataclass(frozen=True)
class SkippedConv:
    name: str
    reason: str


def conv_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    return [n for n in graph.node if n.op_type == "Conv" and n.domain in ("", "ai.onnx")]


def find_prunable_convs(model: onnx.ModelProto, groups_for, min_channels: int, exclude=()):
    """Split the model's Convs into prunable ``ConvInfo`` and ``SkippedConv`` with a reason.

    ``groups_for(conv_info) -> int`` gives the groups wanted for a layer, so the divisibility
    check follows whatever grouping policy the caller has.
    """
    index = GraphIndex(model.graph)
    excluded = set(exclude)
    prunable, skipped = [], []
    for node in conv_nodes(model.graph):
        reason, info = _classify(index, node, min_channels, excluded)
        if info is not None:
            g = groups_for(info)
            if info.c_out % g:
                reason, info = f"C_out={info.c_out} not divisible by groups={g}", None
        if info is None:
            skipped.append(SkippedConv(node.name, reason))
        else:
            prunable.append(info)
    return prunable, skipped


def _classify(index: GraphIndex, node: onnx.NodeProto, min_channels: int, excluded: set):
    if node.name in excluded:
        return "excluded by --exclude", None
    weight = index.constant(node.input[1]) if len(node.input) > 1 else None
    if weight is None:
        return "weight is not a constant (dynamic weight)", None
    if weight.dtype.kind != "f":
        return f"weight dtype {weight.dtype} is not floating point", None
    if weight.ndim != 4:
        return f"not a 2-D convolution (weight rank {weight.ndim})", None
    if len(node.input) > 2 and node.input[2] and index.constant(node.input[2]) is None:
        return "bias is not a constant", None
    group = get_attr(node, "group", 1)
    c_out, c_in_per_group = weight.shape[:2]
    if group != 1:
        kind = "depthwise" if c_in_per_group == 1 and group == c_out else f"already grouped (group={group})"
        return kind, None
    if c_in_per_group < min_channels or c_out < min_channels:
        return f"too few channels (C_in={c_in_per_group}, C_out={c_out} < min-channels {min_channels})", None
    return "", ConvInfo(node.name, node.input[1], int(c_out), int(c_in_per_group),
                        (int(weight.shape[2]), int(weight.shape[3])))
