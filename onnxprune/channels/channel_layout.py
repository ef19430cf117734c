"""The layout rules of ``channel_groups``: ops that move, cut, glue or reshape channels.

Split from ``channel_rules`` (which holds the tracer and the channelwise and weight rules) only
to keep each module short; ``LayoutRules`` is a mixin of ``ChannelTracer`` and uses its state
(``width``, ``shapes``, ``index``, ``tie``, ``edits``, ...). Each rule returns None when it
handled the node, or the reason the node freezes its channel tensors; it ties nothing before it
knows it will succeed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..ir.graph import GraphIndex, get_attr
from ..ir.ops import is_default_domain


@dataclass(frozen=True)
class Edit:
    """One rewrite a pruning pass makes at node ``node`` (its index in the graph).

    kinds: ``slice`` — constant input ``input`` keeps, along ``axis``, the kept channels of
    ``tensor`` (each widened to ``block`` consecutive entries); ``group`` — the node's ``group``
    attribute becomes the kept count of ``tensor``; ``split`` — Split sizes become the kept
    counts of the node's outputs; ``start`` / ``end`` — entry ``axis`` of constant input
    ``input`` (Slice starts/ends) becomes the position of channel ``start`` of ``source``
    among its kept channels (``end``: plus the kept count of ``tensor``); ``gather`` — constant
    indices become that range; ``shape`` — entry ``axis`` of constant input ``input`` becomes
    the kept count of ``tensor`` times ``block``.
    """

    kind: str
    node: int
    input: int
    tensor: str
    axis: int = 0
    block: int = 1
    source: str = ""
    start: int = 0


@dataclass(frozen=True)
class Read:
    """Input ``input`` of node ``node`` reads the channels of ``tensor`` as a consumer (they
    meet a weight there); ``block`` > 1: it reads them flattened, ``block`` features each."""

    node: int
    input: int
    tensor: str
    block: int = 1


def _axes(node, index: GraphIndex, input_index: int, rank: int):
    """The node's ``axes`` (attribute, or constant input since opset 13/18) made non-negative;
    None when they are not constant, [] when absent."""
    axes = get_attr(node, "axes")
    if axes is None and len(node.input) > input_index and node.input[input_index]:
        value = index.constant(node.input[input_index])
        if value is None:
            return None
        axes = value.reshape(-1).tolist()
    return [int(a) % rank for a in (axes or [])]


class LayoutRules:
    """Rules for Flatten/Reshape/Squeeze/Unsqueeze/reductions/Transpose/Pad/Resize and the channel-range ops."""

    def _flatten_to(self, at, node, x: str, y: str, shape_input: int | None):
        """``y`` is ``x`` [N, C, ...] flattened to [N, C·HW] (Flatten, or Reshape with constant
        ``shape_input``)."""
        dims = self.shapes.get(x)
        if x not in self.width or not dims or not all(isinstance(d, int) for d in dims[2:]):
            return "input shape unknown"
        block = int(np.prod(dims[2:], dtype=np.int64))
        out = self.shapes.get(y)
        if not out or len(out) != 2 or out[1] != self.width[x] * block:
            return "does not flatten [N, C, ...] into [N, C·H·W]"
        if shape_input is not None:
            target = self.index.constant(node.input[shape_input]).reshape(-1)
            if target[1] == self.width[x] * block:
                self.edits.append(Edit("shape", at, shape_input, x, axis=1, block=block))
        if block == 1:
            self._pass(at, x, y)
            return None
        readers = self.index.consumers.get(y, [])
        fine = all(r.op_type in ("Gemm", "MatMul") and r.input[0] == y and r.input[1] != y and is_default_domain(r)
                   for r in readers)
        if not fine or y in self.index.graph_outputs:
            return f"flattens a {'x'.join(map(str, dims[2:]))} map and its readers are not all Gemm/MatMul"
        self.hidden[y] = (x, block)  # its readers become consumers of x, block features a channel
        self.passthrough[x].append(at)
        return None

    def _rule_Flatten(self, at, node):
        if get_attr(node, "axis", 1) % len(self.shapes.get(node.input[0]) or [2]) != 1:
            return "Flatten at an axis other than 1"
        return self._flatten_to(at, node, node.input[0], node.output[0], None)

    def _rule_Reshape(self, at, node):
        target = self.index.constant(node.input[1])
        x, y = node.input[0], node.output[0]
        in_dims, out_dims = self.shapes.get(x), self.shapes.get(y)
        if target is None or not in_dims or not out_dims or get_attr(node, "allowzero", 0):
            return "shape is not a constant (or allowzero, or unknown shapes)"
        target = target.reshape(-1).tolist()
        if len(target) < 2:
            return "reshapes to rank < 2"
        batch_kept = target[0] in (0, -1) or (target[0] == in_dims[0] and isinstance(in_dims[0], int))
        if not batch_kept or -1 in target[1:] and target[0] == -1:
            return "the batch axis is not kept as axis 0"
        if len(out_dims) == 2 and any(d != 1 for d in in_dims[2:]):
            return self._flatten_to(at, node, x, y, 1)
        units = all(d == 1 for d in list(in_dims[2:]) + list(out_dims[2:]))
        if not units or target[1] not in (0, -1, self.width.get(x)):
            return "moves channels off axis 1 (only [N, C, 1, 1] <-> [N, C] and flattening are understood)"
        reason = self._same(x, y)
        if reason is None:
            if target[1] == self.width[x]:
                self.edits.append(Edit("shape", at, 1, x, axis=1))
            self._pass(at, x, y)
        return reason

    def _squeeze(self, at, node, rank_for_axes: int):
        axes = _axes(node, self.index, 1, rank_for_axes)
        if not axes or 0 in axes or 1 in axes:
            return "axes not constant, not given, or touching the batch/channel axis"
        return self._pass_if_same(at, node)

    def _rule_Squeeze(self, at, node):
        return self._squeeze(at, node, len(self.shapes.get(node.input[0]) or [0]))

    def _rule_Unsqueeze(self, at, node):
        return self._squeeze(at, node, len(self.shapes.get(node.output[0]) or [0]))

    def _rule_reduce(self, at, node):
        rank = len(self.shapes.get(node.input[0]) or [0])
        return self._squeeze(at, node, rank)  # the same test: constant axes off the batch/channel axes

    def _rule_Transpose(self, at, node):
        rank = len(self.shapes.get(node.input[0]) or [])
        perm = list(get_attr(node, "perm", list(range(rank))[::-1]))
        if perm[:2] != [0, 1]:
            return f"moves the channel axis (perm={perm})"
        return self._pass_if_same(at, node)

    def _rule_Pad(self, at, node):
        x = node.input[0]
        rank = len(self.shapes.get(x) or [])
        pads = get_attr(node, "pads") if self.opset < 11 else self.index.constant(node.input[1])
        axes = _axes(node, self.index, 3, rank) if len(node.input) > 3 and node.input[3] else list(range(rank))
        if pads is None or axes is None or any(n and self.index.constant(n) is None for n in node.input[2:3]):
            return "pads, value or axes not constant"
        pads = list(np.asarray(pads).reshape(-1))
        if 1 in axes and (pads[axes.index(1)] or pads[len(axes) + axes.index(1)]):
            return "pads the channel axis"
        reason = self._same(x, node.output[0])
        if reason is None:
            self._pass(at, x, node.output[0])
        return reason

    def _rule_Resize(self, at, node):
        x, y = node.input[0], node.output[0]
        if get_attr(node, "axes") is not None:
            return "axes attribute (not handled)"
        inputs = list(node.input) + [""] * 4
        scales_name = inputs[2] if node.op_type == "Resize" and self.opset >= 11 else inputs[1]
        scales = self.index.constant(scales_name) if scales_name else get_attr(node, "scales")
        sizes = self.index.constant(inputs[3]) if node.op_type == "Resize" and inputs[3] else None
        if (scales is None or np.size(scales) == 0) and sizes is None:
            return "scales and sizes are not constants"
        if sizes is None and float(np.asarray(scales).reshape(-1)[1]) != 1.0:
            return "scales the channel axis"
        reason = self._same(x, y)
        if reason is None and sizes is not None:
            if int(sizes.reshape(-1)[1]) != self.width[x]:
                return "resizes the channel axis"
            self.edits.append(Edit("shape", at, 3, x, axis=1))
        if reason is None:
            self._pass(at, x, y)
        return reason

    def _rule_Upsample(self, at, node):
        return self._rule_Resize(at, node)

    # -- rules: ranges of channels ---------------------------------------------------------
    def _rule_Concat(self, at, node):
        y = node.output[0]
        rank = len(self.shapes.get(y) or [0])
        if any(x not in self.width for x in node.input) or y not in self.width:
            return "an input is a constant or of unknown shape"
        if get_attr(node, "axis") % rank != 1:
            if any(self.width[x] != self.width[y] for x in node.input):
                return "channel counts differ"
            for x in node.input:
                self.tie(x, y)
        else:
            start = 0
            for x in node.input:
                self.tie(y, x, start)
                start += self.width[x]
        self.passthrough[y].append(at)
        return None

    def _rule_Split(self, at, node):
        x, live = node.input[0], [o for o in node.output]
        rank = len(self.shapes.get(x) or [0])
        if x not in self.width or any(o not in self.width for o in live):
            return "input or an output of unknown shape"
        if get_attr(node, "axis", 0) % rank != 1:
            if any(self.width[o] != self.width[x] for o in live):
                return "channel counts differ"
            for o in live:
                self.tie(x, o)
        else:
            if sum(self.width[o] for o in live) != self.width[x]:
                return "output widths do not add up to the input's"
            start = 0
            for o in live:
                self.tie(x, o, start)
                start += self.width[o]
            self.edits.append(Edit("split", at, 1, x))
        self.passthrough[x].append(at)
        return None

    def _rule_Slice(self, at, node):
        x, y = node.input[0], node.output[0]
        rank = len(self.shapes.get(x) or [0])
        if self.opset < 10:
            return "Slice-1 (attributes) is not handled"
        values = [self.index.constant(n) if n else None for n in list(node.input[1:5]) + [""] * 3]
        if any(n and v is None for n, v in zip(list(node.input[1:5]) + [""] * 3, values)):
            return "starts, ends, axes or steps not constant"
        starts, ends = values[0].reshape(-1).tolist(), values[1].reshape(-1).tolist()
        axes = [a % rank for a in (values[2].reshape(-1).tolist() if values[2] is not None else range(len(starts)))]
        if x not in self.width or y not in self.width:
            return "input or output shape unknown"
        if 1 not in axes:
            reason = self._same(x, y)
            if reason is None:
                self._pass(at, x, y)
            return reason
        pos, width = axes.index(1), self.width[x]
        if values[3] is not None and values[3].reshape(-1)[pos] != 1:
            return "slices channels with a step other than 1"
        start = min(max(starts[pos] + width if starts[pos] < 0 else starts[pos], 0), width)
        end = min(max(ends[pos] + width if ends[pos] < 0 else ends[pos], 0), width)
        if end - start != self.width[y]:
            return "output width does not match the slice"
        self.tie(x, y, start)
        self.edits += [Edit("start", at, 1, y, axis=pos, source=x, start=start),
                       Edit("end", at, 2, y, axis=pos, source=x, start=start)]
        self.passthrough[y].append(at)
        return None

    def _rule_Gather(self, at, node):
        x, y = node.input[0], node.output[0]
        rank = len(self.shapes.get(x) or [0])
        indices = self.index.constant(node.input[1])
        axis = get_attr(node, "axis", 0) % rank
        if indices is None or axis == 0 or x not in self.width or y not in self.width:
            return "indices not constant, gathers along the batch, or shapes unknown"
        if axis != 1:
            reason = self._same(x, y)
            if reason is None:
                self._pass(at, x, y)
            return reason
        picked = (indices.reshape(-1) % self.width[x]).tolist()
        if indices.ndim != 1 or not picked or picked != list(range(picked[0], picked[0] + len(picked))):
            return "picks channels out of order (only a contiguous ascending range is understood)"
        self.tie(x, y, picked[0])
        self.edits.append(Edit("gather", at, 1, y, source=x, start=picked[0]))
        self.passthrough[y].append(at)
        return None
