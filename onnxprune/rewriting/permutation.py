"""Carry a Conv's output channel permutation forward through the graph, absorbing it where that is free.

A rewritten Conv emits its filters group by group (``filter_order``), so its output channels
are a permutation of the original ones. Instead of undoing that after every Conv (what the
paper's code does), the permutation travels forward and is absorbed where that costs nothing.
Rules, per consumer of a permuted tensor (sigma: physical channel -> logical):

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
  passes sigma on; a pruned Conv folds it into its Gather indices (``rewrite.py``), so
  consecutive Gathers compose into one;
- reductions over spatial axes only (ReduceMean as global pooling) pass sigma on;
- Concat along channels passes on the concatenation of its inputs' permutations;
- Gemm / MatMul with a constant weight absorb sigma into the weight rows;
- anything else (Transpose, Softmax, graph outputs, unknown ops) gets the original order back
  through a ``Gather(axis=1, sigma^-1)``, created once per tensor.

Graphs with subgraphs (If/Loop) may read any tensor implicitly, so there (``fold`` False) every
permutation is restored right after the Conv that made it.

Why separate from ``rewrite.py``: these rules are per consumer op and grow with every op the
pruner learns to see through; the rewrite of the pruned Convs themselves (and the Gathers folded
into producers, ``gather_fold.py``) only *start* permutations and call ``_propagate`` for every
other node that reads one. The state (``perm``, ``width``, the nodes emitted so far) and the
graph-editing helpers live here because every rule needs them.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..errors import InternalError
from ..ir.graph import GraphIndex, NameAllocator, get_attr, set_attr, set_initializer
from ..ir.ops import CHANNEL_PARAM_NORMS, CHANNELWISE_UNARY, ELEMENTWISE_BINARY, REDUCTIONS, UNIT_RESHAPES


def inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    inv[perm] = np.arange(len(perm))
    return inv


def is_identity(perm: np.ndarray) -> bool:
    return bool(np.array_equal(perm, np.arange(len(perm))))


class _PermutationRules:
    """Rebuilds ``graph``'s node list (``nodes``) while tracking each tensor's channel permutation.

    ``shapes``: static shapes by tensor name (symbolic dims as names); ``fold``: whether
    permutations may travel (False: restore each one at once, see above).
    """

    def __init__(self, graph: onnx.GraphProto, shapes: dict[str, list], fold: bool):
        self.graph = graph
        self.index = GraphIndex(graph)
        self.names = NameAllocator(graph)
        self.shapes = shapes
        self.fold = fold
        # tensor -> sigma: physical channel p holds logical channel sigma[p]. sigma may be shorter
        # than the logical width (``width``) when a producer was narrowed to the channels read.
        self.perm: dict[str, np.ndarray] = {}
        self.width: dict[str, int] = {}
        self.restored: dict[str, str] = {}
        self.nodes: list[onnx.NodeProto] = []

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

