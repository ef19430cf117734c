"""Apply a pruning plan: each pruned Conv becomes ``Gather(axis=1)`` + ``Conv(group=G)``.

The rewritten Conv emits its filters group by group (``filter_order``), so its output channels
are a permutation of the original ones; that permutation travels forward through the graph and
is absorbed where that costs nothing (the rules: ``permutation.py``), and a Gather whose input
comes from a Conv with a free output order is folded into that producer (``gather_fold.py``).

This module is the driver and the pruned-Conv rewrite. Rules:
- the model must be normalized; a plan (hand-made too) is validated first, and a plan naming a
  Conv the model lacks, a weight shape other than the plan's, or an already grouped Conv is a
  ``UserError``;
- nodes are rewritten in graph order, each once: a pruned Conv; else a producer given an order;
  else a node reading a permuted tensor (the permutation rules); else copied as it is;
- the pruned Conv's Gather picks its kept channels (``kept_in_channels``, group by group) in the
  physical order of its input, so an input permutation (or a narrowed producer) costs nothing
  more; the Gather is left out when it would be the identity; its weight is ``grouped_weight``;
  its filters come in the producer order imposed on it, if any, else ``filter_order``;
- afterwards unused initializers are removed and shape annotations that no longer hold (of
  rewritten initializers and narrowed tensors) are dropped.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..errors import InternalError, UserError
from .gather_fold import _GatherFolding
from ..ir.graph import get_attr, has_subgraphs, remove_unused_initializers, set_attr
from .permutation import inverse, is_identity
from ..planning.plan import LayerPlan, Plan
from ..ir.shape_facts import tensor_shapes

__all__ = ["apply_plan", "grouped_weight", "inverse", "is_identity"]


def grouped_weight(weight: np.ndarray, layer: LayerPlan, filter_order=None) -> np.ndarray:
    """W'[j] = W[filter_order[j], kept channels of j's group]: the Conv(group=G) weight."""
    per_group = layer.filters_per_group
    order = layer.filter_order if filter_order is None else filter_order
    blocks = []
    for g, kept in enumerate(layer.kept_in_channels):
        rows = order[g * per_group:(g + 1) * per_group]
        blocks.append(weight[np.asarray(rows)][:, np.asarray(kept)])
    return np.concatenate(blocks, axis=0)


def apply_plan(model: onnx.ModelProto, plan: Plan) -> onnx.ModelProto:
    """Return a new model with every Conv of ``plan`` rewritten; ``model`` must be normalized."""
    for layer in plan.layers:  # a hand-made plan gets the checks a loaded one gets
        layer.validate()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _Rewriter(out, plan).run()
    return out


class _Rewriter(_GatherFolding):
    def __init__(self, model: onnx.ModelProto, plan: Plan):
        self.model = model
        self.layers = plan.by_node()
        super().__init__(model.graph, tensor_shapes(model), not has_subgraphs(model.graph))
        self.producer_order = self._producer_orders() if self.fold else {}

    # -- driver -------------------------------------------------------------------------
    def run(self) -> None:
        conv_names = {n.name for n in self.graph.node if n.op_type == "Conv"}
        missing = [name for name in self.layers if name not in conv_names]
        if missing:
            raise UserError(f"plan names Conv nodes not in this model: {', '.join(missing[:5])}")
        for node in list(self.graph.node):
            new = onnx.NodeProto()
            new.CopyFrom(node)
            if node.op_type == "Conv" and node.name in self.layers:
                self._rewrite_pruned_conv(new, self.layers[node.name])
            elif node.name in self.producer_order:
                self._reorder_dense_producer(new, self.producer_order[node.name])
            elif any(name in self.perm for name in new.input):
                self._propagate(new)
            else:
                self.nodes.append(new)
        del self.graph.node[:]
        self.graph.node.extend(self.nodes)
        remove_unused_initializers(self.graph)
        self._drop_stale_value_info()

    def _drop_stale_value_info(self) -> None:
        """Shape annotations of rewritten weights and narrowed tensors no longer hold: drop them."""
        stale = {t.name for t in self.graph.initializer}
        stale |= {name for name, sigma in self.perm.items() if len(sigma) != self.width[name]}
        keep = [vi for vi in self.graph.value_info if vi.name not in stale]
        del self.graph.value_info[:]
        self.graph.value_info.extend(keep)

    # -- pruned Conv --------------------------------------------------------------------
    def _rewrite_pruned_conv(self, node: onnx.NodeProto, layer: LayerPlan) -> None:
        weight = self.index.constant(node.input[1])
        expected = (layer.c_out, layer.c_in, *layer.kernel)
        if weight is None or tuple(weight.shape) != expected:
            got = None if weight is None else tuple(weight.shape)
            raise UserError(f"plan layer {layer.node!r} expects weight shape {expected}, model has {got}")
        if get_attr(node, "group", 1) != 1:
            raise UserError(f"plan layer {layer.node!r}: the model's Conv is already grouped")
        indices = np.concatenate([np.asarray(k, dtype=np.int64) for k in layer.kept_in_channels])
        source = node.input[0]
        sigma = self.perm.get(source)
        if sigma is not None:
            position = np.full(layer.c_in, -1, dtype=np.int64)
            position[sigma] = np.arange(len(sigma))
            indices = position[indices]
            if np.any(indices < 0):
                raise InternalError(f"{node.name} reads channels its narrowed producer dropped")
        physical_width = layer.c_in if sigma is None else len(sigma)
        if not (len(indices) == physical_width and is_identity(indices)):
            gathered = self.names.new(f"{source}__kept_by_{node.name}")
            self._emit_gather(source, indices, gathered, f"{node.name}/gather_kept_channels")
            node.input[0] = gathered
        order = self.producer_order.get(node.name, np.asarray(layer.filter_order, dtype=np.int64))
        self._set_param(node, 1, grouped_weight(weight, layer, order))
        if len(node.input) > 2 and node.input[2]:
            bias = self.index.constant(node.input[2])
            self._set_param(node, 2, bias[order])
        set_attr(node, "group", layer.groups)
        self.nodes.append(node)
        self._set_output_perm(node, 0, order, layer.c_out)
