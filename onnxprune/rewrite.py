"""Apply a pruning plan: each pruned Conv becomes ``Gather(axis=1)`` + ``Conv(group=G)``.

The rewritten Conv emits its filters group by group (``filter_order``), so its output channels
are a permutation of the original ones. Instead of undoing that after every Conv (what the
paper's code does), the permutation travels forward through the graph and is absorbed where that
costs nothing. Rules, per consumer of a permuted tensor (sigma: physical channel -> logical):

- per-channel elementwise ops (activations, Dropout, pooling, Cast, ...): pass sigma on;
- BatchNormalization / InstanceNormalization / PRelu: their per-channel parameters are permuted;
- binary ops (Add, Mul, ...): constants varying along channels are permuted; operands that are
  channel-broadcast need nothing; operands permuted differently are re-gathered into the first
  one's order (one Gather) and that order passes on; an unpermuted operand that varies along
  channels (a residual Add's identity input) makes the permuted ones restore the original order;
- Flatten / Reshape / Squeeze / Unsqueeze that only drop or add unit dims after the channel
  axis (GlobalAveragePool -> Flatten) pass sigma on;
- a dense Conv absorbs sigma into its weight's input axis; a depthwise Conv permutes (or, when
  its input was narrowed, selects) its filters and bias, sets ``group`` to the channels kept and
  passes sigma on; a pruned Conv folds it into its Gather indices (so consecutive
  Gathers compose into one);
- reductions over spatial axes only (ReduceMean as global pooling) pass sigma on;
- Concat along channels passes on the concatenation of its inputs' permutations;
- Gemm / MatMul with a constant weight absorb sigma into the weight rows;
- anything else (Transpose, Softmax, graph outputs, unknown ops) gets the original order back
  through a ``Gather(axis=1, sigma^-1)``, created once per tensor.

Graphs with subgraphs (If/Loop) may read any tensor implicitly, so there every permutation is
restored right after the Conv that made it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .graph import (GraphIndex, NameAllocator, get_attr, has_subgraphs, remove_unused_initializers,
                    set_attr, set_initializer)
from .analysis import foldable_producer
from .errors import InternalError, UserError
from .ops import CHANNEL_PARAM_NORMS, CHANNELWISE_UNARY, ELEMENTWISE_BINARY, REDUCTIONS, UNIT_RESHAPES
from .plan import LayerPlan, Plan
from .shape_facts import tensor_shapes



def inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    inv[perm] = np.arange(len(perm))
    return inv


def is_identity(perm: np.ndarray) -> bool:
    return bool(np.array_equal(perm, np.arange(len(perm))))


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


class _Rewriter:
    def __init__(self, model: onnx.ModelProto, plan: Plan):
        self.model = model
        self.graph = model.graph
        self.layers = plan.by_node()
        self.index = GraphIndex(self.graph)
        self.names = NameAllocator(self.graph)
        self.shapes = tensor_shapes(model)
        self.fold = not has_subgraphs(self.graph)
        # tensor -> sigma: physical channel p holds logical channel sigma[p]. sigma may be shorter
        # than the logical width (``width``) when a producer was narrowed to the channels read.
        self.perm: dict[str, np.ndarray] = {}
        self.width: dict[str, int] = {}
        self.restored: dict[str, str] = {}
        self.nodes: list[onnx.NodeProto] = []
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

    # -- Gather elimination -------------------------------------------------------------
    def _producer_orders(self) -> dict[str, np.ndarray]:
        """Output channel order (possibly a subset) to impose on producers of pruned Convs.

        When a pruned Conv's Gather reads each channel at most once, and its input comes from a
        Conv whose output order is free (dense, or pruned with G=1) through a private chain of
        channelwise ops, that producer emits exactly the channels the Gather would pick, in that
        order: the Gather disappears, and channels no one reads are never computed.
        """
        orders: dict[str, np.ndarray] = {}
        for node in self.graph.node:
            layer = self.layers.get(node.name)
            if layer is None or node.op_type != "Conv":
                continue
            producer = foldable_producer(self.index, node.name)
            if producer is None or producer in orders:
                continue
            producer_layer = self.layers.get(producer)
            if producer_layer is not None and producer_layer.groups != 1:
                continue
            indices = np.concatenate([np.asarray(k, dtype=np.int64) for k in layer.kept_in_channels])
            _, first = np.unique(indices, return_index=True)
            order = indices[np.sort(first)]
            if len(order) != len(indices) or (len(order) == layer.c_in and is_identity(order)):
                continue
            if len(order) < layer.c_in and not self._chain_shapes_known(node, producer):
                continue
            orders[producer] = order
        return orders

    def _chain_shapes_known(self, node, producer: str) -> bool:
        tensor = node.input[0]
        while self.index.producer[tensor].name != producer:
            link = self.index.producer[tensor]
            if self._rank(link.output[0]) is None:
                return False
            tensor = link.input[0]
        return True

    def _reorder_dense_producer(self, node, order: np.ndarray) -> None:
        """Emit a dense Conv's filters in ``order`` (a subset when consumers read fewer)."""
        weight = self.index.constant(node.input[1])
        sigma = self.perm.get(node.input[0])
        if sigma is not None:
            self._require_full(sigma, self.width[node.input[0]], node.input[0])
            weight = weight[:, sigma]
        self._set_param(node, 1, weight[order])
        if len(node.input) > 2 and node.input[2]:
            self._set_param(node, 2, self.index.constant(node.input[2])[order])
        self.nodes.append(node)
        self._set_output_perm(node, 0, order, weight.shape[0])

    # -- permutation propagation --------------------------------------------------------
    def _propagate(self, node: onnx.NodeProto) -> None:
        op = node.op_type if node.domain in ("", "ai.onnx") else None
        handler = None
        if op in CHANNELWISE_UNARY:
            handler = self._channelwise
        elif op in CHANNEL_PARAM_NORMS:
            handler = self._norm
        elif op in ELEMENTWISE_BINARY:
            handler = self._binary
        elif op in UNIT_RESHAPES:
            handler = self._unit_reshape
        elif op == "Conv":
            handler = self._dense_conv
        elif op in ("Gemm", "MatMul"):
            handler = self._matmul
        elif op == "Concat":
            handler = self._concat
        elif op in REDUCTIONS:
            handler = self._reduce
        if handler is None or not handler(node):
            self._restore_inputs(node)
            self.nodes.append(node)

    def _channelwise(self, node) -> bool:
        sigma = self.perm.get(node.input[0])
        if sigma is None or any(n in self.perm for n in node.input[1:] if n):
            return False
        if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1]:
            return False  # the indices output encodes channel offsets
        if node.op_type == "PRelu":
            rank = self._rank(node.input[0])
            if rank is None or not self._permute_channel_const(node, 1, sigma, rank, self.width[node.input[0]]):
                return False
        self.nodes.append(node)
        for i, name in enumerate(node.output):
            if name:
                self._set_output_perm(node, i, sigma, self.width[node.input[0]])
        return True

    def _norm(self, node) -> bool:
        sigma = self.perm.get(node.input[0])
        params = CHANNEL_PARAM_NORMS[node.op_type]
        if sigma is None or any(node.input[i] in self.perm for i in params if i < len(node.input)):
            return False
        values = [self.index.constant(node.input[i]) for i in params]
        if any(v is None or v.shape != (self.width[node.input[0]],) for v in values):
            return False
        for i, value in zip(params, values):
            self._set_param(node, i, value[sigma])
        self.nodes.append(node)
        self._set_output_perm(node, 0, sigma, self.width[node.input[0]])
        return True

    def _binary(self, node) -> bool:
        rank = self._rank(node.output[0])
        if rank is None:
            return False
        first = next(n for n in node.input if n in self.perm)
        sigma, width = self.perm[first], self.width[first]
        for i, name in enumerate(node.input):
            if name in self.perm and not np.array_equal(self.perm[name], sigma):
                if len(self.perm[name]) != self.width[name] or len(sigma) != width:
                    return False
                node.input[i] = self._aligned(name, sigma)
        for i, name in enumerate(node.input):
            if name in self.perm:
                continue
            const = self.index.constant(name)
            if const is not None:
                if not self._permute_channel_const(node, i, sigma, rank, width):
                    return False
            elif self._varies_along_channels(name, rank):
                return False
        self.nodes.append(node)
        self._set_output_perm(node, 0, sigma, width)
        return True

    def _unit_reshape(self, node) -> bool:
        sigma = self.perm.get(node.input[0])
        if sigma is None:
            return False
        before, after = self.shapes.get(node.input[0]), self.shapes.get(node.output[0])
        if before is None or after is None or len(before) < 2 or len(after) < 2:
            return False
        # With channels and only unit dims after them on both sides, the batch dim must match too.
        width = self.width[node.input[0]]
        if before[1] != width or after[1] != width:
            return False
        if any(d != 1 for d in list(before[2:]) + list(after[2:])):
            return False
        self.nodes.append(node)
        self._set_output_perm(node, 0, sigma, width)
        return True

    def _dense_conv(self, node) -> bool:
        sigma = self.perm.get(node.input[0])
        weight = self.index.constant(node.input[1]) if len(node.input) > 1 else None
        if sigma is None or weight is None or any(n in self.perm for n in node.input[1:] if n):
            return False
        group, width = get_attr(node, "group", 1), self.width[node.input[0]]
        if group == 1 and weight.shape[1] == width:
            self._set_param(node, 1, weight[:, sigma])
            self.nodes.append(node)
            return True
        if group == width == weight.shape[0] and weight.shape[1] == 1:  # depthwise: narrows with its input
            bias = self.index.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if len(node.input) > 2 and node.input[2] and bias is None:
                return False
            self._set_param(node, 1, weight[sigma])
            if bias is not None:
                self._set_param(node, 2, bias[sigma])
            set_attr(node, "group", len(sigma))
            self.nodes.append(node)
            self._set_output_perm(node, 0, sigma, width)
            return True
        return False

    def _matmul(self, node) -> bool:
        sigma = self.perm.get(node.input[0])
        weight = self.index.constant(node.input[1]) if len(node.input) > 1 else None
        if sigma is None or weight is None or weight.ndim != 2 or self._rank(node.input[0]) != 2:
            return False
        if any(n in self.perm for n in node.input[1:] if n):
            return False
        if node.op_type == "Gemm":
            if get_attr(node, "transA", 0):
                return False
            transposed = bool(get_attr(node, "transB", 0))
        else:
            transposed = False
        k_axis = 1 if transposed else 0
        if weight.shape[k_axis] != self.width[node.input[0]]:
            return False
        self._set_param(node, 1, np.take(weight, sigma, axis=k_axis))
        self.nodes.append(node)
        return True

    def _concat(self, node) -> bool:
        rank = self._rank(node.output[0])
        if rank is None or get_attr(node, "axis") not in (1, 1 - rank):
            return False
        pieces, offset = [], 0
        for name in node.input:
            shape = self.shapes.get(name)
            if shape is None or not isinstance(shape[1], int) or shape[1] <= 0:
                return False
            sigma = self.perm.get(name, np.arange(shape[1]))
            if len(sigma) != shape[1]:
                return False  # a narrowed tensor cannot sit inside a concatenation
            pieces.append(sigma + offset)
            offset += shape[1]
        self.nodes.append(node)
        self._set_output_perm(node, 0, np.concatenate(pieces).astype(np.int64), offset)
        return True

    def _reduce(self, node) -> bool:
        sigma = self.perm.get(node.input[0])
        rank = self._rank(node.input[0])
        if sigma is None or rank is None or any(n in self.perm for n in node.input[1:] if n):
            return False
        axes = get_attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = self.index.constant(node.input[1])
        if axes is None or len(axes) == 0:
            return False  # reduces every axis, channels included
        if {int(a) % rank for a in np.ravel(axes)} & {0, 1}:
            return False
        self.nodes.append(node)
        self._set_output_perm(node, 0, sigma, self.width[node.input[0]])
        return True

    # -- helpers ------------------------------------------------------------------------
    def _rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)

    def _varies_along_channels(self, name: str, rank: int) -> bool:
        shape = self.shapes.get(name)
        if shape is None:
            return True
        offset = rank - len(shape)
        return offset <= 1 and shape[1 - offset] != 1

    def _permute_channel_const(self, node, i: int, sigma: np.ndarray, rank: int, width: int) -> bool:
        """Permute/select constant input ``i`` (broadcast to ``rank``) along the channel axis.

        False if it cannot be done (it varies along channels with a length other than ``width``)."""
        value = self.index.constant(node.input[i])
        if value is None:
            return False
        value_axis = 1 - (rank - value.ndim)
        if value.ndim == 0 or value_axis < 0 or value.shape[value_axis] == 1:
            return True
        if value.shape[value_axis] != width:
            return False
        self._set_param(node, i, np.take(value, sigma, axis=value_axis))
        return True

    def _set_param(self, node, i: int, value: np.ndarray) -> None:
        """Point input ``i`` at ``value``: in place if nothing else reads it, else a new name."""
        name = node.input[i]
        if self.index.use_count(name) > 1:
            role = {1: "weight", 2: "bias"}.get(i, f"input{i}")
            name = self.names.new(f"{node.name}.{role}")
        set_initializer(self.graph, name, value)
        node.input[i] = name

    def _set_output_perm(self, node, i: int, sigma: np.ndarray, width: int) -> None:
        name = node.output[i]
        if len(sigma) == width and is_identity(sigma):
            return
        if name in self.index.graph_outputs or not self.fold:
            self._require_full(sigma, width, name)
            physical = self.names.new(f"{name}__permuted")
            node.output[i] = physical
            self._emit_gather(physical, inverse(sigma), name, f"{node.name}/restore_order_{i}")
            return
        self.perm[name] = sigma
        self.width[name] = width

    def _aligned(self, name: str, sigma: np.ndarray) -> str:
        """``name`` re-gathered into channel order ``sigma``: one Gather instead of two restores."""
        aligned = self.names.new(f"{name}__aligned")
        self._emit_gather(name, inverse(self.perm[name])[sigma], aligned, f"{name}/align_order")
        self.perm[aligned], self.width[aligned] = sigma, self.width[name]
        return aligned

    @staticmethod
    def _require_full(sigma: np.ndarray, width: int, name: str) -> None:
        if len(sigma) != width:
            raise InternalError(f"{name} was narrowed but a consumer needs all its channels")

    def _restore_inputs(self, node) -> None:
        for i, name in enumerate(node.input):
            if name in self.perm:
                self._require_full(self.perm[name], self.width[name], name)
                if name not in self.restored:
                    restored = self.names.new(f"{name}__original_order")
                    self._emit_gather(name, inverse(self.perm[name]), restored, f"{name}/restore_order")
                    self.restored[name] = restored
                node.input[i] = self.restored[name]

    def _emit_gather(self, source: str, indices: np.ndarray, output: str, node_name: str) -> None:
        idx_name = self.names.new(f"{node_name}.indices")
        set_initializer(self.graph, idx_name, np.asarray(indices, dtype=np.int64))
        self.nodes.append(helper.make_node("Gather", [source, idx_name], [output],
                                           name=self.names.new(node_name), axis=1))
