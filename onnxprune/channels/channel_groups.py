"""Coupled channel groups: the channels of a graph that can only be pruned together.

Why: ``analysis.foldable_chain`` narrows one Conv's input through a private chain to its
producer. A channel of a residual stream is written by several Convs (and the Adds between
them), read by several others, cut by Split, glued by Concat and gated by an SE block; dropping
it is only exact when every producer stops writing it, every pass-through op drops its
per-channel parameters and every consumer stops reading it — all at once. This module finds
those sets; ``prune_groups`` removes them.

Model: every tensor with a channel axis (axis 1: C of an N×C×H×W map, F of an N×F matrix) is a
row of channels, and union-find ties single channels: channel c of one tensor *is* channel c'
of another when an op passes it on. Tied channels form classes; classes that hold the same
tensors at consecutive positions form one ``ChannelGroup`` of ``width`` channels, with
``members`` (tensor, offset): group channel i is channel offset + i of that tensor.

Rules, per node that touches such a tensor (``channel_rules`` implements them). An op not
listed here, or listed but failing its condition, FREEZES every channel tensor it reads or
writes, recording ``(node, op, reason)``: a frozen group is never pruned, so an op we do not
understand can cost width but never correctness.

- non-default domains, nodes holding subgraphs (If/Loop/Scan: also every tensor the subgraph
  reads), graph inputs and graph outputs freeze;
- Conv / ConvTranspose (group 1) and Gemm / MatMul (2-D input, transA=0) with constant weights
  (and bias) are *producers* of their output channels (weight axis 0 — ConvTranspose: 1 —,
  bias) and *consumers* of their input channels (weight axis 1 — ConvTranspose: 0; Gemm: the
  rows of B, columns with transB); a dynamic weight or bias freezes both sides;
- a depthwise Conv (weight [C, 1, k, k], group = C_in = C_out) ties channel c in to channel c
  out; its filters and bias are sliced and ``group`` becomes the kept count; any other grouped
  Conv (and every grouped ConvTranspose) freezes: its channels are tied group by group;
- channelwise unary ops (``ops.CHANNELWISE_UNARY``: activations, Cast, pooling, global pooling)
  tie input and output when their extra inputs are scalar constants and their extra outputs
  (MaxPool indices, Dropout mask) unread; PRelu, BatchNormalization and InstanceNormalization
  also need constant parameters, which are sliced when they vary along channels; training-mode
  BatchNormalization freezes;
- elementwise ops (Add, Sub, Mul, Div, Max, Min, Sum, Mean, Pow) tie every operand whose
  channel extent is the output's (same rank); an operand of extent 1 is broadcast (the SE gate
  Mul(x [N,C,H,W], s [N,C,1,1]) ties s's channels to x's — s's producer, the excitation Conv,
  joins the stream's group); a constant that varies along channels is sliced;
- reductions (ReduceMean, ReduceMax, ...) and Squeeze / Unsqueeze with constant axes that
  avoid axes 0 and 1 tie input and output (the SE squeeze);
- Transpose ties when it keeps axes 0 and 1 in place, else freezes (an NHWC detour is not
  followed); Pad ties when it pads no channel; Resize / Upsample tie when the channel scale is 1
  (a constant ``sizes`` is rewritten);
- Flatten (axis 1), and Reshape with a constant shape that keeps the batch on axis 0, of an
  N×C×1×1 map (or [N,C] <-> [N,C,1,1]) tie channel c to feature c (a literal C in the shape is
  rewritten); of an N×C×H×W map with H·W > 1, channel c is the H·W features
  [c·H·W, (c+1)·H·W): allowed only when every reader is a Gemm/MatMul, which then consumes the
  map's channels in blocks; any other reshape freezes;
- Concat on axis 1: input k's channels are the output's channels [offset_k, offset_k + C_k);
  Split on axis 1 the reverse (its sizes are rewritten); Slice on axis 1 with constant
  starts/ends and step 1 ties the output to its range (starts/ends are rewritten); Gather on
  axis 1 only with constant indices that form a contiguous ascending range. On any other axis
  these ops tie channel c to channel c.

A group is ``prunable`` when it is not frozen and has at least one producer (channels made by
a constant alone are not pruned). Order is graph order: groups by their first tensor, node
lists by position.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx

from .channel_rules import ChannelTracer, Edit, Read
from ..errors import UserError
from ..ir.shape_facts import tensor_shapes

__all__ = ["ChannelAnalysis", "ChannelGroup", "Edit", "Read", "channel_groups"]


@dataclass(frozen=True)
class ChannelGroup:
    """Channels pruned together: group channel i is channel ``offset + i`` of each member."""

    id: int
    width: int
    members: tuple[tuple[str, int], ...]  # (tensor, offset), graph order
    producers: tuple[str, ...]  # nodes whose filters write these channels
    consumers: tuple[str, ...]  # nodes whose weights read them
    passthrough: tuple[str, ...]  # nodes that carry them on (their parameters are sliced)
    frozen_by: tuple[tuple[str, str, str], ...]  # (node or tensor, op, reason)

    @property
    def prunable(self) -> bool:
        return not self.frozen_by and bool(self.producers)


@dataclass(frozen=True)
class ChannelAnalysis:
    groups: tuple[ChannelGroup, ...]
    widths: dict[str, int]  # channel tensor -> its channel count
    edits: tuple[Edit, ...]  # what a pruning pass rewrites, node by node
    reads: tuple[Read, ...]  # where consumers read channels (the masked model masks there)
    hidden: dict[str, tuple[str, int]] = field(default_factory=dict)  # flattened map -> (map, H·W)

    def kept_channels(self, keep: dict[int, list[int]]) -> dict[str, np.ndarray]:
        """Kept channel indices of every tensor ``keep`` narrows (tensors absent keep all).

        ``keep``: group id -> the group's channels to keep (sorted, unique, at least one).
        """
        alive: dict[str, np.ndarray] = {}
        for gid, kept in keep.items():
            group = self._checked(gid, kept)
            for tensor, offset in group.members:
                row = alive.setdefault(tensor, np.ones(self.widths[tensor], dtype=bool))
                row[offset:offset + group.width] = False
                row[offset + np.asarray(kept, dtype=np.int64)] = True
        return {t: np.flatnonzero(row) for t, row in alive.items() if not row.all()}

    def _checked(self, gid: int, kept) -> ChannelGroup:
        if not 0 <= gid < len(self.groups):
            raise UserError(f"no channel group {gid} (the model has {len(self.groups)})")
        group = self.groups[gid]
        if not group.prunable:
            why = group.frozen_by[0] if group.frozen_by else "it has no producer"
            raise UserError(f"channel group {gid} cannot be pruned: {why}")
        values = [int(k) for k in kept]
        if not values or values != sorted(set(values)) or values[0] < 0 or values[-1] >= group.width:
            raise UserError(f"channel group {gid}: kept channels must be sorted, unique, non-empty and "
                            f"within [0, {group.width})")
        return group


def channel_groups(model: onnx.ModelProto) -> ChannelAnalysis:
    """The coupled channel groups of ``model`` (normalized: constants are initializers)."""
    tracer = ChannelTracer(model, tensor_shapes(model))
    tracer.run()
    visible = [t for t in tracer.order if t not in tracer.hidden]
    classes: dict[int, list[tuple[int, int]]] = defaultdict(list)  # root -> (tensor position, channel)
    for position, tensor in enumerate(visible):
        base = tracer.base[tensor]
        for c in range(tracer.width[tensor]):
            classes[tracer.find(base + c)].append((position, c))
    known = {tuple(members) for members in classes.values()}
    names = [n.name or f"{n.op_type}#{i}" for i, n in enumerate(model.graph.node)]
    groups = []
    for members in classes.values():  # in order of each class's first channel: graph order
        if tuple((t, c - 1) for t, c in members) in known:
            continue  # not the first channel of its group
        width = 1
        while tuple((t, c + width) for t, c in members) in known:
            width += 1
        tensors = [visible[t] for t, _ in members]
        groups.append(ChannelGroup(
            id=len(groups), width=width, members=tuple((visible[t], c) for t, c in members),
            producers=_nodes(tracer.producers, tensors, names), consumers=_nodes(tracer.consumers, tensors, names),
            passthrough=_nodes(tracer.passthrough, tensors, names),
            frozen_by=tuple(dict.fromkeys(e for t in tensors for e in tracer.frozen.get(t, ())))))
    return ChannelAnalysis(tuple(groups), {t: tracer.width[t] for t in visible}, tuple(tracer.edits),
                           tuple(tracer.reads), dict(tracer.hidden))


def _nodes(by_tensor: dict[str, list[int]], tensors: list[str], names: list[str]) -> tuple[str, ...]:
    return tuple(names[i] for i in sorted({i for t in tensors for i in by_tensor.get(t, ())}))
