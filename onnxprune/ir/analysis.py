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
from .ops import CHANNEL_PARAM_NORMS, CHANNELWISE_UNARY, is_default_domain


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
    if weight is None and len(node.input) > 1 and node.input[1] in index.graph_inputs:
        return "weight is a graph input (an initializer the caller may override)", None
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
    if c_in_per_group < min_channels or c_out < min_channels:  # the reason names only the counts below it
        below = " and ".join(f"{label}={count}" for label, count in (("C_in", c_in_per_group), ("C_out", c_out))
                             if count < min_channels)
        return f"too few channels ({below} < min-channels {min_channels})", None
    return "", ConvInfo(node.name, node.input[1], int(c_out), int(c_in_per_group),
                        (int(weight.shape[2]), int(weight.shape[3])))


def foldable_producer(model_or_index, conv_name: str) -> str | None:
    """The producer of ``foldable_chain`` (see there), or None."""
    return foldable_chain(model_or_index, conv_name)[0]


def foldable_chain(model_or_index, conv_name: str) -> tuple[str | None, list[str]]:
    """The dense Conv whose output reaches ``conv_name``'s input through a private chain, or None.

    The chain may only hold ops that act on each channel alone (activations, pooling,
    BatchNormalization with constant parameters, arithmetic with a constant, depthwise Convs —
    MobileNet's expand → depthwise → project chain) and every tensor on it must have exactly one
    reader. Then the producer's output channels can be reordered or dropped
    to suit the consumer: a Gather that only permutes (disjoint groups) or selects (G=1) channels
    disappears into the producer's filters, which keeps ORT's blocked layout between layers and,
    for a selection, skips computing channels nobody reads.

    Returns (producer, the depthwise Convs on the chain — narrowed with it), or (None, []).
    """
    index = model_or_index if isinstance(model_or_index, GraphIndex) else GraphIndex(model_or_index.graph)
    node = next((n for n in index.graph.node if n.name == conv_name), None)
    if node is None:
        return None, []
    tensor = node.input[0]
    depthwise: list[str] = []
    while True:
        if index.use_count(tensor) != 1:
            return None, []
        producer = index.producer.get(tensor)
        if producer is None or not is_default_domain(producer):
            return None, []
        if producer.op_type == "Conv" and is_depthwise(index, producer):
            depthwise.append(producer.name)
            tensor = producer.input[0]  # channel c in, channel c out: a selection passes through
            continue
        if producer.op_type == "Conv":
            weight = index.constant(producer.input[1]) if len(producer.input) > 1 else None
            biased = len(producer.input) > 2 and producer.input[2]
            if weight is None or get_attr(producer, "group", 1) != 1 or weight.ndim != 4:
                return None, []
            if biased and index.constant(producer.input[2]) is None:
                return None, []
            return producer.name, depthwise
        if not _passes_channel_selection(index, producer):
            return None, []
        tensor = producer.input[0]


def gather_folds(producer_groups: int | None, reads_each_channel_once: bool) -> bool:
    """The fold rule: does a pruned Conv's input Gather disappear into its producer?

    It does when ``foldable_chain`` found a producer (``producer_groups`` is None when it found
    none), that producer's output order is free — it stays dense or is pruned with G=1
    (``producer_groups == 1``; a grouped producer emits its filters group by group, in an order
    its own plan fixes) — and the Gather reads each channel at most once, i.e. it only permutes
    or selects (a channel read twice cannot be one filter's output).

    One rule, two callers that know different things: the rewrite (``gather_fold.py``) applies
    it to a plan's actual kept channels; the speed planner (``speed_plan._Planner.needs_gather``)
    predicts it before any channel is chosen, from a candidate's groups: G=1 and disjoint groups
    read each channel at most once, other grouped choices are taken to read some channel twice.
    """
    return producer_groups == 1 and reads_each_channel_once


def is_depthwise(index: GraphIndex, node) -> bool:
    """A Conv with one constant filter per channel (group = C_in = C_out, depth multiplier 1), a
    constant bias if any, and one live output: selecting its output channels selects its input
    channels, filters and bias the same way (its ``group`` becomes the number kept)."""
    weight = index.constant(node.input[1]) if len(node.input) > 1 else None
    if weight is None or weight.ndim != 4 or weight.shape[1] != 1 or get_attr(node, "group", 1) != weight.shape[0]:
        return False
    if len(node.input) > 2 and node.input[2] and index.constant(node.input[2]) is None:
        return False
    live_outputs = [o for o in node.output if o and index.use_count(o)]
    return live_outputs == [node.output[0]]


def _passes_channel_selection(index: GraphIndex, node) -> bool:
    """True if ``node`` maps channel c of its first input to channel c of its single output."""
    live_outputs = [o for o in node.output if o and index.use_count(o)]
    if len(live_outputs) != 1 or live_outputs[0] != node.output[0]:
        return False
    others = [name for name in node.input[1:] if name]
    if node.op_type in CHANNELWISE_UNARY and node.op_type != "PRelu":
        return all(index.constant(name) is not None and index.constant(name).size == 1 for name in others)
    if node.op_type in CHANNEL_PARAM_NORMS:
        return all(index.constant(name) is not None for name in others)
    if node.op_type in ("Add", "Sub", "Mul", "Div") and len(node.input) == 2:
        return index.constant(node.input[1]) is not None
    return False
