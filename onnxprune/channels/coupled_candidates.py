"""Coupled channel groups as candidate cuts of the fidelity planner (``--coupled-rate auto``).

Why: a fixed ``--coupled-rate`` cuts every residual stream, Concat and SE group by the same
fraction, which is right for a ResNet (its streams are wide and redundant) and ruinous for a
pretrained MobileNetV2 (its narrow linear bottlenecks carry the whole signal: 35.9% top-1
agreement at 0.85 MACs with rate 0.25). The knapsack of ``planning.allocate`` already weighs every
single-Conv cut by its fidelity cost; giving it the groups' cuts too lets it narrow a stream only
where that costs less output change per MAC (or µs) saved than the single-Conv cuts it displaces.

How, per group that ``coupled.eligible`` allows, whose Conv readers the single-Conv rules would
prune (``--min-channels``: ``coupled.dense_reader``, judged by the planner's layers) and whose
readers read no other such group (so a reader's input is cut either by its own single-Conv cut
or by its group, never both):
1. widths: ``FRACTIONS`` of the group's width, aligned to the provider's block, distinct, narrower
   than the group; channels kept: a prefix of ``coupled.rank_channels``' order (the same ranking
   ``--coupled-rate R`` uses), so the widths are nested;
2. saving: MACs and predicted µs of the writers (fewer filters) and the readers (fewer input
   channels), from the cost model the single-Conv candidates use. Elementwise ops on the group
   (the residual Add, its ReLU) are not in the cost model: the time saving is understated;
3. cost, with calibration data: the change of the network's outputs (``sensitivity.output_change``:
   mean KL of class scores, relative error of anything else, summed over the graph outputs) on
   the held-out calibration inputs when the readers' columns of the dropped channels are zero —
   exactly what the cut computes *before* the refit, so it is conservative (the refit of the
   readers only lowers it); without data: the single-Conv
   proxy's definition (fraction of a reader's ‖W‖² in the dropped input channels) summed over the
   readers, i.e. the group costs what cutting each reader alone would.
The candidates are plain data (``GroupCandidates``); the planner's choice becomes a
``coupled.CoupledPlan`` through ``coupled.plan_cuts``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import onnx

from ..calibration.calib_stream import batch_size, count, split_holdout
from ..calibration.refit_steps import gemm_as_conv_weight
from ..ir.graph import GraphIndex, get_attr
from ..ir.macs import conv_macs, count_macs
from ..planning.latency import ConvOp
from ..checks.class_scores import output_kinds
from ..planning.sensitivity import graph_outputs, output_change
from ..planning.speed_plan import Layer, align_channels
from .channel_groups import ChannelGroup
from .coupled import Eligible, dense_reader, rank_channels, reader_channel_energy

FRACTIONS = (0.75, 0.5)  # kept fractions of a group's width offered to the planner
PROBE_SAMPLES = 64  # held-out calibration inputs a group cut's output change is measured on


@dataclass(frozen=True)
class GroupCut:
    kept: tuple[int, ...]  # kept group channels, ascending
    saving_macs: int
    saving_us: float
    cost: float


@dataclass(frozen=True)
class GroupCandidates:
    members: tuple
    width: int
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    cuts: tuple[GroupCut, ...]
    passthrough: tuple[str, ...] = ()  # ops carrying the group on (depthwise Convs among them)
    gemm_macs_per_channel: float = 0.0  # MACs its Gemm readers (outside the Conv planner) lose per channel

    def as_dict(self) -> dict:
        return {"members": [list(m) for m in self.members[:3]], "width": self.width,
                "producers": list(self.producers), "consumers": list(self.consumers),
                "widths": [len(c.kept) for c in self.cuts], "cost": [round(c.cost, 6) for c in self.cuts],
                "saving_macs": [c.saving_macs for c in self.cuts]}


def group_candidates(model: onnx.ModelProto, layers: dict[str, Layer], cost, align: int, feeds: dict | None,
                     found: Eligible) -> list[GroupCandidates]:
    """Every usable group's candidate cuts on ``model`` (normalized; ``layers``: its Convs as the
    planner sees them, ``cost``: the planner's cost model; ``found``: ``coupled.eligible`` of it,
    whose ``left`` gains the groups auto mode cannot use)."""
    def dense_reason(name: str) -> str:  # the planner's layers know which Convs the single-Conv rules prune
        layer = layers.get(name)
        if layer is None or layer.prunable:  # a Gemm, or a Conv with no static shape (refused below)
            return ""
        return f"C_in={layer.c_in}, C_out={layer.c_out} (its skip reason says why)"

    candidates = []
    for group in found.candidates:
        reason = dense_reader(group, dense_reason)
        if reason:
            found.left.append({"members": [list(m) for m in group.members[:3]], "width": group.width,
                               "reason": reason})
        else:
            candidates.append(group)
    readers: dict[str, int] = {}
    for group in candidates:
        for name in group.consumers:
            readers[name] = readers.get(name, 0) + 1
    index = GraphIndex(model.graph)
    nodes = {n.name: n for n in model.graph.node}
    initializers = {init.name for init in model.graph.initializer}
    usable = []
    for group in candidates:
        if any(readers[name] > 1 for name in group.consumers):
            reason = "a reader also reads another group (auto mode cuts one group per reader)"
        elif not all(name in layers for name in group.producers) or not all(
                name in layers or nodes[name].op_type == "Gemm" for name in group.consumers):
            reason = "a member Conv has no static shape (its time cannot be predicted)"
        elif not all(nodes[name].input[1] in initializers for name in group.consumers):
            reason = "a reader's weight is not an initializer (its cut cannot be probed)"
        else:
            usable.append(group)
            continue
        found.left.append({"members": [list(m) for m in group.members[:3]], "width": group.width, "reason": reason})
    ranked = rank_channels(model, usable, feeds)
    _, per_node = count_macs(model)
    probe = _Probe(model, feeds, index, nodes) if feeds else None
    out = []
    for group in usable:
        gemm_macs = sum(_gemm_macs_per_input(nodes[name], index, per_node) for name in group.consumers
                        if name not in layers)
        cuts = []
        for kept_count in sorted({align_channels(f * group.width, align, group.width) for f in FRACTIONS},
                                 reverse=True):
            if kept_count >= group.width:
                continue
            kept = tuple(sorted(ranked[group.members][:kept_count]))
            dropped = sorted(set(range(group.width)) - set(kept))
            macs, us = _saving(group, len(dropped), layers, cost)
            macs += gemm_macs * len(dropped)
            if macs <= 0:
                continue
            fidelity = probe.cost(group, dropped) if probe else _proxy(group, dropped, index, nodes)
            cuts.append(GroupCut(kept, int(macs), float(us), float(fidelity)))
        if cuts:
            out.append(GroupCandidates(group.members, group.width, group.producers, group.consumers, tuple(cuts),
                                       tuple(group.passthrough), gemm_macs))
    return out


def narrowed_layers(layers: dict[str, Layer], chosen: list[tuple[GroupCandidates, GroupCut]]) -> dict[str, Layer]:
    """``layers`` as they run with the chosen group cuts: writers with fewer filters, depthwise
    Convs the group passes through with fewer channels, readers with fewer input channels (and no
    single-Conv cut of their own)."""
    layers = dict(layers)
    for group, cut in chosen:
        dropped = group.width - len(cut.kept)
        for name in group.producers:
            layers[name] = replace(layers[name], c_out=layers[name].c_out - dropped)
        for name in _depthwise(group, layers):
            layer = layers[name]
            layers[name] = replace(layer, c_in=layer.c_in - dropped, c_out=layer.c_out - dropped,
                                   groups=layer.groups - dropped)
        for name in group.consumers:
            if name in layers:
                layers[name] = replace(layers[name], c_in=layers[name].c_in - dropped, prunable=False)
    return layers


def gemm_saving(chosen: list[tuple[GroupCandidates, GroupCut]]) -> int:
    """MACs the chosen cuts save in Gemm readers (not in the planner's Conv layers)."""
    return int(sum(group.gemm_macs_per_channel * (group.width - len(cut.kept)) for group, cut in chosen))


def _gemm_macs_per_input(node, index: GraphIndex, per_node: dict) -> float:
    weight = gemm_as_conv_weight(node, index.constant(node.input[1]))
    return per_node.get(node.name, 0) / max(1, int(weight.shape[1]))


def _saving(group: ChannelGroup, dropped: int, layers: dict[str, Layer], cost) -> tuple[float, float]:
    """(MACs, µs) the writers, the depthwise Convs on the group and the Conv readers save when
    ``dropped`` channels of the group go (Gemm readers: ``GroupCandidates.gemm_macs_per_channel``;
    the cost model times Convs only)."""
    macs = us = 0.0
    for name in group.producers:
        layer = layers[name]
        before, after = _conv(layer, layer.c_in, layer.c_out, cost), _conv(layer, layer.c_in, layer.c_out - dropped,
                                                                           cost)
        macs, us = macs + before[1] - after[1], us + before[0] - after[0]
    for name in _depthwise(group, layers):  # its channels run through depthwise Convs: they shrink too
        layer = layers[name]
        n = layer.c_out
        for width, sign in ((n, 1), (n - dropped, -1)):
            op = ConvOp(width, width, width, layer.kernel, layer.stride, layer.h_out, layer.w_out)
            us += sign * cost.conv_us(op)
            macs += sign * conv_macs(width, 1, layer.kernel, (layer.h_out, layer.w_out))
    for name in group.consumers:
        if name not in layers:
            continue
        layer = layers[name]
        before, after = _conv(layer, layer.c_in, layer.c_out, cost), _conv(layer, layer.c_in - dropped, layer.c_out,
                                                                           cost)
        macs, us = macs + before[1] - after[1], us + before[0] - after[0]
    return macs, us


def _depthwise(group, layers: dict[str, Layer]) -> list[str]:
    """The depthwise Convs among the ops that carry ``group`` on (channel in = channel out)."""
    return [name for name in group.passthrough
            if name in layers and layers[name].groups == layers[name].c_in == layers[name].c_out > 1]


def _conv(layer: Layer, c_in: int, c_out: int, cost) -> tuple[float, int]:
    """(µs, MACs) of ``layer`` (a plain Conv: writers and readers of a group are G=1) at these widths."""
    op = ConvOp(c_in, c_out, 1, layer.kernel, layer.stride, layer.h_out, layer.w_out)
    return cost.conv_us(op), conv_macs(c_out, c_in, layer.kernel, (layer.h_out, layer.w_out))


def _columns(group: ChannelGroup, tensor: str, dropped: list[int]) -> list[int]:
    """Input channels of a reader of ``tensor`` that are the group's ``dropped`` channels."""
    return [offset + c for t, offset in group.members if t == tensor for c in dropped]


def _proxy(group: ChannelGroup, dropped: list[int], index: GraphIndex, nodes: dict) -> float:
    total = 0.0
    for name in group.consumers:
        node = nodes[name]
        energy = reader_channel_energy(node, index)
        total += float(energy[_columns(group, node.input[0], dropped)].sum() / max(energy.sum(), 1e-30))
    return total


class _Probe:
    """The network's output change when a group's dropped channels are read as zero."""

    def __init__(self, model: onnx.ModelProto, feeds: dict, index: GraphIndex, nodes: dict):
        self.model, self.index, self.nodes = model, index, nodes
        self.batch, unit, feeds = batch_size(model, feeds, [])
        _, held = split_holdout(feeds, unit)
        if not count(held):
            held = feeds
        keep = max(unit, min(PROBE_SAMPLES, count(held)) // unit * unit)
        self.held = {k: v[:keep] for k, v in held.items()}
        self.kinds = output_kinds(model)
        self.reference = graph_outputs(model, self.held, self.batch, kinds=self.kinds)

    def cost(self, group: ChannelGroup, dropped: list[int]) -> float:
        masked = onnx.ModelProto()
        masked.CopyFrom(self.model)
        by_name = {init.name: init for init in masked.graph.initializer}
        for name in group.consumers:
            node = self.nodes[name]
            weight = self.index.constant(node.input[1]).copy()
            columns = _columns(group, node.input[0], dropped)
            if node.op_type == "Gemm" and not get_attr(node, "transB", 0):  # B is [inputs, outputs]
                weight[columns, :] = 0.0
            else:  # a Conv's [out, in, ...] or a Gemm's transposed B
                weight[:, columns] = 0.0
            by_name[node.input[1]].CopyFrom(onnx.numpy_helper.from_array(weight, node.input[1]))
        got = graph_outputs(masked, self.held, self.batch, names=list(self.reference), kinds=self.kinds)
        return output_change(self.reference, got, self.model.graph.output[0].name)["kl"]
