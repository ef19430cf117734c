"""Small read/write helpers over an ``onnx.GraphProto``.

Why not a full IR: every pass here needs the same three things — who produces a tensor, who
consumes it, and the value of a constant — and the graphs we touch are flat CNN graphs. Keeping
to plain ``onnx`` protos means what we emit is exactly what we wrote (deterministic bytes, opset
and IR version untouched).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper


class GraphIndex:
    """Producer/consumer maps and constant lookup for one graph, built once per pass.

    Passes that mutate the graph build a fresh index afterwards instead of patching this one.
    """

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.initializers = {t.name: t for t in graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for name in node.output:
                if name:
                    self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.graph_outputs = {o.name for o in graph.output}
        self.graph_inputs = {i.name for i in graph.input}

    def constant(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if it is an initializer (not overridable by an input)."""
        if name in self.initializers and name not in self.graph_inputs:
            return numpy_helper.to_array(self.initializers[name])
        return None

    def use_count(self, name: str) -> int:
        """How many node inputs plus graph outputs read ``name``."""
        return len(self.consumers.get(name, [])) + (1 if name in self.graph_outputs else 0)


def get_attr(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, attr in enumerate(node.attribute):
        if attr.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


def set_initializer(graph: onnx.GraphProto, name: str, array: np.ndarray) -> None:
    """Replace the initializer ``name`` in place (keeping its position) or append it."""
    tensor = numpy_helper.from_array(np.ascontiguousarray(array), name)
    for i, init in enumerate(graph.initializer):
        if init.name == name:
            graph.initializer[i].CopyFrom(tensor)
            return
    graph.initializer.append(tensor)


def remove_unused_initializers(graph: onnx.GraphProto) -> None:
    """Drop initializers nothing reads. One that is also a graph input (an overridable default)
    stays: dropping it would turn that input into a required one the caller never fed."""
    used = {name for node in graph.node for name in node.input}
    used |= {o.name for o in graph.output}
    used |= {i.name for i in graph.input}
    used |= _subgraph_references(graph)
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _subgraph_references(graph: onnx.GraphProto) -> set[str]:
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            subgraphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
            for sub in subgraphs:
                for sub_node in sub.node:
                    names.update(sub_node.input)
                names |= _subgraph_references(sub)
    return names


FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                         onnx.TensorProto.BFLOAT16})


def is_float_cast(node: onnx.NodeProto) -> bool:
    """A Cast to a float type: it changes a value's precision, not what it means (the fp16
    converter puts one before each graph output), so what a tensor is reads through it."""
    return node.op_type == "Cast" and get_attr(node, "to") in FLOAT_TYPES


def subgraphs(node: onnx.NodeProto):
    """The graphs held by ``node``'s attributes (If's branches, Loop's body, ...)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def all_graphs(graph: onnx.GraphProto):
    """``graph`` and every graph nested in it, depth first."""
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from all_graphs(sub)


def has_subgraphs(graph: onnx.GraphProto) -> bool:
    return any(attr.HasField("g") or len(attr.graphs) for node in graph.node for attr in node.attribute)


class NameAllocator:
    """Hands out tensor/node names not yet used in the graph, deterministically."""

    def __init__(self, graph: onnx.GraphProto):
        self.taken: set[str] = set()
        for node in graph.node:
            self.taken.update(node.input)
            self.taken.update(node.output)
            self.taken.add(node.name)
        self.taken.update(t.name for t in graph.initializer)
        self.taken.update(v.name for v in graph.input)
        self.taken.update(v.name for v in graph.output)
        self.taken.update(v.name for v in graph.value_info)

    def new(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name = f"{base}_{i}"
            i += 1
        self.taken.add(name)
        return name
