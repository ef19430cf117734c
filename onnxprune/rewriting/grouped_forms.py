"""Other ONNX forms of a grouped-kernel layer, for providers where ``Conv(group=G)`` is slow.

Why: the paper's layer is ``Gather`` + ``Conv(group=G)``. On ORT's CPU provider that is fast
(``../shared/notes/ort-cpu-grouped-conv.md``), but cuDNN's grouped convolutions at these widths
(G = 8, 16-64 filters per group) ran 3-10x slower than the dense layer they replace on an H100
(``../shared/notes/ort-cuda-h100.md``). The same function can be written with ops a GPU runs
well; which one wins is measured (``benchmarks/gpu_session.py``), not assumed: on an H100 the
``union`` form was fastest in every setting, so the pipeline writes it for ``--provider cuda``.

Forms (``FORMS``), each exactly the function of the grouped Conv it replaces:
- ``grouped``: unchanged (the paper's form);
- ``split``: the gathered input ``Split`` into its G chunks, one dense Conv per group, ``Concat``;
- ``union``: one dense Conv over the channels *any* group reads, its kernel zero where a group
  does not read a channel. The input ``Gather`` is folded in: the Conv reads the Gather's input,
  through ``Gather(U)`` only when the union U is not every channel in order. Costs the dense
  layer's MACs over U (at the paper's rate 0.4375 and G = 8, U is almost every channel), but
  runs as one dense kernel;
- ``matmul``: a 1x1, stride-1, unpadded grouped Conv as one broadcast batched ``MatMul``:
  ``Reshape`` to [N, G, k, H*W], ``MatMul`` with the weight as [G, C_out/G, k], ``Reshape`` back
  to [N, C_out, H, W] and the bias added. Needs the output's H and W known (static); a layer
  whose H or W is symbolic keeps its grouped form. (ORT's MatMul refuses an empty batch, N = 0.)

Rules:
- only Convs with ``group`` > 1 and more than one input channel per group change: a depthwise
  Conv is already the fast form of itself; a grouped Conv whose weight is not a constant
  initializer is left as it is and listed under ``kept``;
- the input Gather (``union``) is folded only when its indices are a constant on axis 1; it is
  removed when the Conv was its only reader (no other node, graph output or subgraph reads it),
  else left for its other readers;
- names are allocated deterministically (``NameAllocator``), so the same model and form give the
  same bytes; opsets and IR version are the input's (``Split`` takes its sizes as an input from
  opset 13, as an attribute before).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..ir.graph import (GraphIndex, NameAllocator, _subgraph_references, get_attr, remove_unused_initializers,
                        set_initializer)
from ..ir.shape_facts import tensor_shapes

FORMS = ("grouped", "split", "union", "matmul")


def grouped_convs(model: onnx.ModelProto) -> list[str]:
    """Names of the Convs a form other than ``grouped`` would change (rule 1 of the module doc)."""
    index = GraphIndex(model.graph)
    return [node.name for node in model.graph.node if _is_grouped(index, node)]


def _grouped_attr(node: onnx.NodeProto) -> bool:
    return node.op_type == "Conv" and get_attr(node, "group", 1) > 1


def _is_grouped(index: GraphIndex, node: onnx.NodeProto) -> bool:
    if not _grouped_attr(node):
        return False
    weight = index.constant(node.input[1])
    return weight is not None and weight.ndim == 4 and weight.shape[1] > 1


def to_form(model: onnx.ModelProto, form: str) -> tuple[onnx.ModelProto, dict]:
    """``model`` with every grouped Conv in ``form``; returns it and a report
    ``{"form", "changed": [names], "kept": {name: reason}}``."""
    if form not in FORMS:
        raise ValueError(f"unknown grouped-layer form {form!r}: choose one of {', '.join(FORMS)}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    report = {"form": form, "changed": [], "kept": {}}
    if form == "grouped":
        return out, report
    graph = out.graph
    index = GraphIndex(graph)
    names = NameAllocator(graph)
    shapes = _LazyShapes(out)  # shape inference only if a form needs a tensor's shape
    implicit = _subgraph_references(graph)  # tensors read inside If/Loop bodies, once for all Convs
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 13)
    new_nodes: list[onnx.NodeProto] = []
    dropped: set[str] = set()
    for node in graph.node:
        if not _is_grouped(index, node):
            if _grouped_attr(node) and index.constant(node.input[1]) is None:
                report["kept"][node.name] = "weight is not a constant initializer"
            new_nodes.append(node)
            continue
        builder = _Builder(graph, index, names, node, opset, shapes, implicit)
        if form == "split":
            replacement = builder.split()
        elif form == "union":
            replacement, gather = builder.union()
            if gather is not None:
                dropped.add(gather)  # the Gather's output tensor: names of nodes may be empty or repeat
        else:
            replacement, reason = builder.matmul(shapes.get(node.output[0]))
            if replacement is None:
                report["kept"][node.name] = reason
                new_nodes.append(node)
                continue
        new_nodes.extend(replacement)
        report["changed"].append(node.name)
    # a folded Gather nothing else reads goes; the list is rebuilt in the original order
    del graph.node[:]
    graph.node.extend(n for n in new_nodes if not (n.op_type == "Gather" and n.output[0] in dropped))
    remove_unused_initializers(graph)
    return out, report


class _LazyShapes:
    """``tensor_shapes`` of the model, inferred on the first lookup: the split form and a union
    without an input Gather never need them, and inference walks the whole graph."""

    def __init__(self, model: onnx.ModelProto):
        self.model, self.shapes = model, None

    def get(self, name: str):
        if self.shapes is None:
            self.shapes = tensor_shapes(self.model)
        return self.shapes.get(name)


class _Builder:
    """The replacement nodes for one grouped Conv ``node`` (its weight, bias and attributes)."""

    def __init__(self, graph, index: GraphIndex, names: NameAllocator, node, opset: int, shapes: _LazyShapes,
                 implicit: set[str]):
        self.graph, self.index, self.names, self.node, self.opset = graph, index, names, node, opset
        self.shapes, self.implicit = shapes, implicit
        self.weight = index.constant(node.input[1])
        self.bias = index.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        self.groups = int(get_attr(node, "group"))
        self.attrs = [a for a in node.attribute if a.name != "group"]

    def _const(self, base: str, array: np.ndarray) -> str:
        name = self.names.new(f"{self.node.name}/{base}")
        set_initializer(self.graph, name, array)
        return name

    def _tensor(self, base: str) -> str:
        return self.names.new(f"{self.node.name}/{base}")

    def _conv(self, x: str, weight: np.ndarray, bias, out: str, tag: str) -> onnx.NodeProto:
        inputs = [x, self._const(f"{tag}_W", weight)]
        if bias is not None:
            inputs.append(self._const(f"{tag}_B", bias))
        conv = helper.make_node("Conv", inputs, [out], name=self.names.new(f"{self.node.name}/{tag}"))
        conv.attribute.extend(self.attrs)
        return conv

    def split(self) -> list[onnx.NodeProto]:
        g, k = self.groups, self.weight.shape[1]
        per = self.weight.shape[0] // g
        chunks = [self._tensor(f"split_{i}") for i in range(g)]
        split_name = self.names.new(f"{self.node.name}/split")
        if self.opset >= 13:
            sizes = self._const("split_sizes", np.full(g, k, dtype=np.int64))
            nodes = [helper.make_node("Split", [self.node.input[0], sizes], chunks, name=split_name, axis=1)]
        else:
            nodes = [helper.make_node("Split", [self.node.input[0]], chunks, name=split_name, axis=1, split=[k] * g)]
        outs = []
        for i in range(g):
            out = self._tensor(f"group_{i}")
            bias = None if self.bias is None else self.bias[i * per:(i + 1) * per]
            nodes.append(self._conv(chunks[i], self.weight[i * per:(i + 1) * per], bias, out, f"conv_{i}"))
            outs.append(out)
        nodes.append(helper.make_node("Concat", outs, [self.node.output[0]],
                                      name=self.names.new(f"{self.node.name}/concat"), axis=1))
        return nodes

    def _gather_source(self):
        """(tensor the channels come from, index of each gathered channel, the Gather's name or
        None): the Conv's input Gather when its indices are a constant on axis 1."""
        x = self.node.input[0]
        gather = self.index.producer.get(x)
        if gather is not None and gather.op_type == "Gather" and get_attr(gather, "axis", 0) == 1:
            indices = self.index.constant(gather.input[1])
            if indices is not None and indices.ndim == 1:
                only_reader = self.index.use_count(x) == 1 and x not in self.implicit
                return gather.input[0], indices.astype(np.int64), (x if only_reader else None)
        return x, np.arange(self.groups * self.weight.shape[1], dtype=np.int64), None

    def union(self) -> tuple[list[onnx.NodeProto], str | None]:
        source, indices, gather = self._gather_source()
        g, k = self.groups, self.weight.shape[1]
        per = self.weight.shape[0] // g
        channels = np.unique(indices)  # sorted union
        column = {int(c): j for j, c in enumerate(channels)}
        dense = np.zeros((self.weight.shape[0], len(channels)) + self.weight.shape[2:], dtype=self.weight.dtype)
        for i in range(g):
            for j in range(k):
                dense[i * per:(i + 1) * per, column[int(indices[i * k + j])]] += self.weight[i * per:(i + 1) * per, j]
        nodes = []
        x = source
        if not np.array_equal(channels, np.arange(self._channels_of(source) or -1)):
            x = self._tensor("union_in")
            nodes.append(helper.make_node("Gather", [source, self._const("union_idx", channels)], [x],
                                          name=self.names.new(f"{self.node.name}/union_gather"), axis=1))
        nodes.append(self._conv(x, dense, self.bias, self.node.output[0], "union"))
        return nodes, gather

    def _channels_of(self, tensor: str) -> int | None:
        """Channel count of ``tensor`` (axis 1) where known; None keeps an explicit Gather."""
        if tensor == self.node.input[0]:
            return self.groups * self.weight.shape[1]
        shape = self.shapes.get(tensor)
        return shape[1] if shape and len(shape) > 1 and isinstance(shape[1], int) else None

    def matmul(self, out_shape) -> tuple[list[onnx.NodeProto] | None, str]:
        kernel = tuple(self.weight.shape[2:])
        strides = tuple(get_attr(self.node, "strides", [1, 1]))
        pads = tuple(get_attr(self.node, "pads", [0, 0, 0, 0]))
        dilations = tuple(get_attr(self.node, "dilations", [1, 1]))
        if kernel != (1, 1) or set(strides) != {1} or set(pads) != {0} or set(dilations) != {1}:
            return None, "not a 1x1, stride-1, unpadded Conv"
        if out_shape is None or len(out_shape) != 4 or not all(isinstance(d, int) and d > 0 for d in out_shape[2:]):
            return None, "output H and W not static"
        g, k = self.groups, self.weight.shape[1]
        c_out = self.weight.shape[0]
        h, w = out_shape[2], out_shape[3]
        stacked = self.weight.reshape(g, c_out // g, k)
        flat = self._tensor("grouped_in")
        product = self._tensor("grouped_out")
        in_shape = self._const("in_shape", np.array([0, g, k, h * w], np.int64))
        out_shape_const = self._const("out_shape", np.array([0, c_out, h, w], np.int64))
        nodes = [
            helper.make_node("Reshape", [self.node.input[0], in_shape], [flat],
                             name=self.names.new(f"{self.node.name}/reshape_in")),
            helper.make_node("MatMul", [self._const("W", stacked), flat], [product],
                             name=self.names.new(f"{self.node.name}/matmul")),
        ]
        shaped = self.node.output[0] if self.bias is None else self._tensor("unbiased")
        nodes.append(helper.make_node("Reshape", [product, out_shape_const], [shaped],
                                      name=self.names.new(f"{self.node.name}/reshape_out")))
        if self.bias is not None:
            nodes.append(helper.make_node("Add", [shaped, self._const("B", self.bias.reshape(c_out, 1, 1))],
                                          [self.node.output[0]], name=self.names.new(f"{self.node.name}/bias")))
        return nodes, ""
