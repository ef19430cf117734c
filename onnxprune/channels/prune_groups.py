"""Prune coupled channel groups, and build the masked model the result must agree with.

Why: ``channel_groups`` finds the channels that can only go together; this pass removes them
from every node at once, so the pruned model computes, on the channels it keeps, exactly what
the original computes there. Rules of ``prune_channel_groups``:

- ``keep`` names prunable groups and the channels each keeps (sorted, unique, at least one);
  the analysis's ``Edit``s are applied wherever a channel tensor they depend on was narrowed
  (producers' filters and biases, consumers' weight inputs, per-channel parameters and
  constants, depthwise ``group``, Split sizes, Slice starts/ends, Gather ranges, literal channel
  counts in Reshape shapes and Resize sizes); nothing else is touched;
- a constant read by more than one node input (or a graph output) is not edited in place: the
  node gets a renamed copy, so a shared weight keeps its meaning for its other readers;
- shape annotations (``value_info``) of narrowed tensors and rewritten constants no longer hold
  and are dropped; unused initializers are removed.

``masked_model`` is the oracle: the original graph with a 0/1 mask multiplied into each channel
tensor where a consumer reads it (a ``Mul`` by a constant [1, C, 1, 1] or [1, F] inserted
before the read). Why at the reads and not after the producers: pass-through ops may turn a
zero into something else (a BatchNormalization shift, ``Add`` of a constant, ``Sigmoid(0)``,
a depthwise bias), and such a value would reach the next layer in the masked model but not in
the pruned one. Every other op between producers and consumers acts on each channel alone
(that is what a group's pass-through rules guarantee) and graph outputs are frozen, so masking
at the reads makes the two models compute the same outputs.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper

from .channel_groups import ChannelAnalysis, Edit, channel_groups
from ..ir.graph import GraphIndex, NameAllocator, remove_unused_initializers, set_attr, set_initializer
from ..ir.shape_facts import tensor_shapes


def prune_channel_groups(model: onnx.ModelProto, keep: dict[int, list[int]],
                         analysis: ChannelAnalysis | None = None) -> onnx.ModelProto:
    """A new model with every group of ``keep`` narrowed to its kept channels (``model`` untouched).

    ``analysis``: ``channel_groups(model)`` when the caller has it already.
    """
    analysis, kept, out, index, names = _editable_copy(model, keep, analysis)
    graph = out.graph
    channels = _Channels(analysis, kept)
    pending: dict[tuple[int, int], list[Edit]] = defaultdict(list)
    for edit in analysis.edits:
        if edit.tensor not in kept and edit.source not in kept:
            continue
        node = graph.node[edit.node]
        if edit.kind == "group":
            set_attr(node, "group", channels.count(edit.tensor))
        elif edit.kind == "split":
            _set_split(out, node, [channels.count(o) for o in node.output], names)
        else:
            pending[(edit.node, edit.input)].append(edit)
    rewritten = set()
    for (at, i), edits in pending.items():
        node = graph.node[at]
        name = node.input[i]
        value = index.constant(name)
        for edit in edits:
            value = channels.apply(edit, value)
        if index.use_count(name) > 1:
            node.input[i] = names.new(f"{name}_{node.name or at}")
        rewritten |= {name, node.input[i]}
        set_initializer(graph, node.input[i], value)
    remove_unused_initializers(graph)
    stale = rewritten | set(kept) | {t for t, (source, _) in analysis.hidden.items() if source in kept}
    live = [vi for vi in graph.value_info if vi.name not in stale]
    del graph.value_info[:]
    graph.value_info.extend(live)
    return out


def masked_model(model: onnx.ModelProto, keep: dict[int, list[int]],
                 analysis: ChannelAnalysis | None = None) -> onnx.ModelProto:
    """``model`` with the channels ``keep`` drops zeroed where consumers read them (see the rules)."""
    analysis, kept, out, index, names = _editable_copy(model, keep, analysis)
    graph = out.graph
    shapes = tensor_shapes(model)
    masked: dict[str, str] = {}
    before: dict[int, list[onnx.NodeProto]] = defaultdict(list)
    for read in analysis.reads:
        if read.tensor not in kept:
            continue
        node = graph.node[read.node]
        name = node.input[read.input]
        if name not in masked:
            width = analysis.widths[read.tensor] * read.block
            mask = np.zeros(width, dtype=index.constant(node.input[1]).dtype)
            mask[_widen(kept[read.tensor], read.block)] = 1
            mask = mask.reshape([1, width] + [1] * (len(shapes[name]) - 2))
            mask_name, masked[name] = names.new(f"{name}_mask"), names.new(f"{name}_masked")
            set_initializer(graph, mask_name, mask)
            before[read.node].append(helper.make_node("Mul", [name, mask_name], [masked[name]],
                                                      name=names.new(f"{name}_mask_mul")))
        node.input[read.input] = masked[name]
    nodes = []
    for at, node in enumerate(graph.node):
        nodes.extend(before.get(at, ()))
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return out


def _editable_copy(model: onnx.ModelProto, keep: dict[int, list[int]], analysis: ChannelAnalysis | None):
    """(analysis, kept channels per tensor, a copy of ``model``, its index, its name allocator)."""
    analysis = analysis or channel_groups(model)
    kept = analysis.kept_channels(keep)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return analysis, kept, out, GraphIndex(out.graph), NameAllocator(out.graph)


def _widen(channels: np.ndarray, block: int) -> np.ndarray:
    """Channel c -> entries [c·block, (c+1)·block) (a flattened map's features)."""
    return (np.asarray(channels, dtype=np.int64)[:, None] * block + np.arange(block)).reshape(-1)


class _Channels:
    """Kept channels per tensor (all of them where ``keep`` did not narrow it) and the edits they drive."""

    def __init__(self, analysis: ChannelAnalysis, kept: dict[str, np.ndarray]):
        self.analysis, self.kept = analysis, kept

    def of(self, tensor: str) -> np.ndarray:
        return self.kept[tensor] if tensor in self.kept else np.arange(self.analysis.widths[tensor])

    def count(self, tensor: str) -> int:
        return len(self.of(tensor))

    def apply(self, edit: Edit, value: np.ndarray) -> np.ndarray:
        if edit.kind == "slice":
            return np.take(value, _widen(self.of(edit.tensor), edit.block), axis=edit.axis)
        value = value.copy()
        flat = value.reshape(-1)
        if edit.kind == "shape":
            flat[edit.axis] = self.count(edit.tensor) * edit.block
            return value
        start = int(np.count_nonzero(self.of(edit.source) < edit.start))  # where the range now begins
        if edit.kind == "start":
            flat[edit.axis] = start
        elif edit.kind == "end":
            flat[edit.axis] = start + self.count(edit.tensor)
        elif edit.kind == "gather":
            return np.arange(start, start + self.count(edit.tensor)).astype(value.dtype)
        else:
            raise ValueError(f"unknown edit kind {edit.kind!r}")
        return value


def _set_split(model: onnx.ModelProto, node: onnx.NodeProto, sizes: list[int], names: NameAllocator) -> None:
    """Explicit Split sizes: an attribute before opset 13, a constant input since."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    for i, attr in enumerate(node.attribute):
        if attr.name == "num_outputs":
            del node.attribute[i]
            break
    if opset < 13:
        set_attr(node, "split", sizes)
        return
    name = names.new(f"{node.name or node.output[0]}_split")
    set_initializer(model.graph, name, np.asarray(sizes, dtype=np.int64))
    if len(node.input) > 1:
        node.input[1] = name
    else:
        node.input.append(name)
