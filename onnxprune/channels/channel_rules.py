"""The per-op rules of ``channel_groups`` (read its docstring for what they are and why).

``ChannelTracer`` walks the graph once, in graph order, and for every node that touches a tensor
with a channel axis either ties channels (union-find over single channels), records what a
pruning pass has to rewrite there (``Edit``, ``Read``), or freezes the tensors it touches with
a reason. A rule checks everything before it ties anything, so a refused op never couples
channels it then freezes.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx

from .channel_layout import Edit, LayoutRules, Read
from ..ir.graph import GraphIndex, get_attr
from ..ir.ops import CHANNEL_PARAM_NORMS, CHANNELWISE_UNARY, ELEMENTWISE_BINARY, REDUCTIONS, is_default_domain

__all__ = ["ChannelTracer", "Edit", "Read"]


class ChannelTracer(LayoutRules):
    """Union-find over the channels of every tensor with a channel axis, plus what the rules record."""

    def __init__(self, model: onnx.ModelProto, shapes: dict[str, list]):
        self.graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self.index = GraphIndex(self.graph)
        self.shapes = shapes
        self.width: dict[str, int] = {}
        self.base: dict[str, int] = {}
        self.order: list[str] = []  # tracked tensors in graph order
        self.parent: list[int] = []
        self.frozen: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
        self.producers: dict[str, list[int]] = defaultdict(list)
        self.consumers: dict[str, list[int]] = defaultdict(list)
        self.passthrough: dict[str, list[int]] = defaultdict(list)
        self.edits: list[Edit] = []
        self.reads: list[Read] = []
        self.hidden: dict[str, tuple[str, int]] = {}  # flattened tensor -> (its 4-D source, block)
        names = [i.name for i in self.graph.input] + [o for n in self.graph.node for o in n.output if o]
        for name in names:
            dims = shapes.get(name)
            if name in self.index.initializers or not dims or len(dims) < 2 or not isinstance(dims[1], int):
                continue
            if name not in self.width and dims[1] > 0:
                self.width[name], self.base[name] = dims[1], len(self.parent)
                self.order.append(name)
                self.parent.extend(range(len(self.parent), len(self.parent) + dims[1]))

    # -- union-find ------------------------------------------------------------------------
    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def tie(self, a: str, b: str, a_start: int = 0, count: int | None = None) -> None:
        """Channel ``a_start + c`` of ``a`` is channel ``c`` of ``b``."""
        count = self.width[b] if count is None else count
        for c in range(count):
            ra, rb = self.find(self.base[a] + a_start + c), self.find(self.base[b] + c)
            if ra != rb:
                self.parent[max(ra, rb)] = min(ra, rb)

    # -- driver ----------------------------------------------------------------------------
    def run(self) -> None:
        for name in (i.name for i in self.graph.input):
            if name in self.width:
                self.frozen[name].append((name, "GraphInput", "a graph input: its channels are the caller's"))
        for at, node in enumerate(self.graph.node):
            self._visit(at, node)
        for out in self.graph.output:
            if out.name in self.width:
                reason = "a graph output: the caller reads every channel"
                self.frozen[out.name].append((out.name, "GraphOutput", reason))

    def _visit(self, at: int, node) -> None:
        touched = [t for t in list(node.input) + list(node.output) if t in self.width or t in self.hidden]
        if not touched:
            return
        if not is_default_domain(node):
            return self.freeze(node, f"domain {node.domain!r}: what it does to channels is unknown")
        if any(a.HasField("g") or len(a.graphs) for a in node.attribute):
            self.freeze(node, "holds subgraphs, which may read any tensor")
            return self._freeze_subgraph_reads(node)
        rule = getattr(self, f"_rule_{node.op_type}", None)
        if rule is None and node.op_type in CHANNELWISE_UNARY and node.op_type != "PRelu":
            rule = self._rule_unary
        elif rule is None and node.op_type in ELEMENTWISE_BINARY:
            rule = self._rule_elementwise
        elif rule is None and node.op_type in CHANNEL_PARAM_NORMS:
            rule = self._rule_norm
        elif rule is None and node.op_type in REDUCTIONS:
            rule = self._rule_reduce
        reason = rule(at, node) if rule else f"{node.op_type} is not known to keep channels apart"
        if reason:
            self.freeze(node, reason)

    def freeze(self, node, reason: str) -> None:
        entry = (node.name, node.op_type, reason)
        for t in list(node.input) + list(node.output):
            t = self.hidden[t][0] if t in self.hidden else t
            if t in self.width and entry not in self.frozen[t]:
                self.frozen[t].append(entry)

    def _freeze_subgraph_reads(self, node) -> None:
        def names(graph):
            for sub_node in graph.node:
                yield from sub_node.input
                for attr in sub_node.attribute:
                    for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                        yield from names(sub)
            yield from (o.name for o in graph.output)
        entry = (node.name, node.op_type, "its subgraph reads this tensor")
        for attr in node.attribute:
            for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                for t in names(sub):
                    t = self.hidden[t][0] if t in self.hidden else t
                    if t in self.width and entry not in self.frozen[t]:
                        self.frozen[t].append(entry)

    # -- helpers ---------------------------------------------------------------------------
    def _live_extra_outputs(self, node) -> bool:
        return any(o and self.index.use_count(o) for o in node.output[1:])

    def _same(self, x: str, y: str) -> str | None:
        if x not in self.width or y not in self.width:
            return "input or output shape unknown"
        if self.width[x] != self.width[y]:
            return f"channel count changes ({self.width[x]} -> {self.width[y]})"
        return None

    def _pass(self, at: int, x: str, y: str) -> None:
        self.tie(x, y)
        self.passthrough[y].append(at)

    def _pass_if_same(self, at: int, node, reason: str | None = None) -> str | None:
        """Tie the node's first input to its output channel for channel unless ``reason`` (or a
        changed channel count) says why not; returns that reason."""
        reason = reason or self._same(node.input[0], node.output[0])
        if reason is None:
            self._pass(at, node.input[0], node.output[0])
        return reason

    def _param(self, at: int, node, i: int, out: str) -> str | None:
        """Constant input ``i`` broadcast against ``out``: sliced if it varies along channels."""
        value = self.index.constant(node.input[i])
        if value is None:
            return f"input {node.input[i]!r} is not a constant"
        rank = len(self.shapes[out])
        axis = value.ndim - (rank - 1)
        if value.ndim > rank or axis < 0 or value.shape[axis] == 1:
            return None
        if value.shape[axis] != self.width[out]:
            return f"parameter {node.input[i]!r} has {value.shape[axis]} entries for {self.width[out]} channels"
        self.edits.append(Edit("slice", at, i, out, axis=axis))
        return None

    # -- rules: channelwise ----------------------------------------------------------------
    def _rule_unary(self, at, node):
        if self._live_extra_outputs(node):
            return "its second output (indices or mask) is read"
        for name in node.input[1:]:
            value = self.index.constant(name) if name else np.zeros(1)
            if value is None or value.size != 1:
                return f"parameter {name!r} is not a scalar constant"
        return self._pass_if_same(at, node)

    def _rule_PRelu(self, at, node):
        return self._pass_if_same(at, node, self._same(node.input[0], node.output[0])
                                  or self._param(at, node, 1, node.output[0]))

    def _rule_norm(self, at, node):
        if self._live_extra_outputs(node) or get_attr(node, "training_mode", 0):
            return "training mode (batch statistics mix the batch)"
        reason = self._same(node.input[0], node.output[0])
        for i in CHANNEL_PARAM_NORMS[node.op_type]:
            value = self.index.constant(node.input[i]) if len(node.input) > i else None
            if reason is None and (value is None or value.shape != (self.width[node.output[0]],)):
                reason = f"parameter {i} is not a constant with one entry per channel"
        if reason is None:
            for i in CHANNEL_PARAM_NORMS[node.op_type]:
                self.edits.append(Edit("slice", at, i, node.output[0]))
            self._pass(at, node.input[0], node.output[0])
        return reason

    def _rule_elementwise(self, at, node):
        y = node.output[0]
        if y not in self.width:
            return "output shape unknown"
        rank, width, tied = len(self.shapes[y]), self.width[y], []
        for name in node.input:
            if self.index.constant(name) is not None:
                continue
            dims = self.shapes.get(name)
            if dims is None:
                return f"shape of {name!r} unknown"
            extent = dims[len(dims) - (rank - 1)] if len(dims) >= rank - 1 else 1
            if extent == 1 and (width != 1 or not (len(dims) == rank and name in self.width)):
                continue  # broadcast along channels
            if len(dims) != rank or name not in self.width or extent != width:
                return f"operand {name!r} varies along channels without its own channel axis"
            tied.append(name)
        for i, name in enumerate(node.input):
            if self.index.constant(name) is not None and (reason := self._param(at, node, i, y)):
                return reason
        for name in tied:
            self.tie(name, y)
        self.passthrough[y].append(at)
        return None

    def _rule_Conv(self, at, node, transpose=False):
        weight = self.index.constant(node.input[1]) if len(node.input) > 1 else None
        if weight is None:
            return "weight is not a constant"
        if len(node.input) > 2 and node.input[2] and self.index.constant(node.input[2]) is None:
            return "bias is not a constant"
        x, y, group = node.input[0], node.output[0], get_attr(node, "group", 1)
        in_axis, out_axis = (0, 1) if transpose else (1, 0)
        if group != 1:
            if transpose or weight.shape[1] != 1 or self._same(x, y) or group != self.width[x]:
                return f"grouped ({'ConvTranspose ' if transpose else ''}group={group}): channels tied group by group"
            self.edits.append(Edit("slice", at, 1, y))
            if len(node.input) > 2 and node.input[2]:
                self.edits.append(Edit("slice", at, 2, y))
            self.edits.append(Edit("group", at, -1, y))
            self._pass(at, x, y)  # depthwise: channel c in, channel c out
            return None
        if x in self.width:
            self.edits.append(Edit("slice", at, 1, x, axis=in_axis))
            self.reads.append(Read(at, 0, x))
            self.consumers[x].append(at)
        if y in self.width:
            self.edits.append(Edit("slice", at, 1, y, axis=out_axis))
            if len(node.input) > 2 and node.input[2]:
                self.edits.append(Edit("slice", at, 2, y))
            self.producers[y].append(at)
        return None

    def _rule_ConvTranspose(self, at, node):
        return self._rule_Conv(at, node, transpose=True)

    def _rule_Gemm(self, at, node):
        weight = self.index.constant(node.input[1])
        if get_attr(node, "transA", 0) or weight is None or weight.ndim != 2:
            return "needs transA=0 and a constant 2-D weight"
        if node.op_type == "MatMul" and len(self.shapes.get(node.input[0]) or []) != 2:
            return "MatMul of a tensor that is not 2-D: its axis 1 is no channel axis"
        trans_b = get_attr(node, "transB", 0)
        source, block = self.hidden.get(node.input[0], (node.input[0], 1))
        y = node.output[0]
        if len(node.input) > 2 and node.input[2] and y in self.width:
            if reason := self._param(at, node, 2, y):
                return reason
        if source in self.width:
            self.edits.append(Edit("slice", at, 1, source, axis=1 if trans_b else 0, block=block))
            self.reads.append(Read(at, 0, source, block))
            self.consumers[source].append(at)
        if y in self.width:
            self.edits.append(Edit("slice", at, 1, y, axis=0 if trans_b else 1))
            self.producers[y].append(at)
        return None

    def _rule_MatMul(self, at, node):
        return self._rule_Gemm(at, node)
