"""Gather elimination: a pruned Conv's input Gather folded into the Conv that produces its input.

When a pruned Conv's Gather reads each channel at most once, and its input comes from a Conv
whose output order is free (dense, or pruned with G=1) through a private chain of channelwise
ops (``analysis.foldable_chain``), that producer emits exactly the channels the Gather would
pick, in that order: the Gather disappears, and channels no one reads are never computed.

Rules:
- whether it folds is ``analysis.gather_folds`` (the speed planner predicts the same rule);
  the order imposed is the Gather's indices in first-read order, and nothing is imposed when
  that is all channels in their own order (there is no Gather to remove);
- a *narrowing* order (fewer channels than the producer makes) is imposed only when every
  tensor on the chain has a known rank, since the chain's per-channel constants are selected
  with it by the permutation rules;
- a dense producer's filters (and bias) are reordered, and an input permutation it reads is
  absorbed into its weight; a G=1 pruned producer takes the order as its filter order
  (``rewrite.py``); the order emitted travels on as a permutation (``permutation.py``), which
  the consumer's rewrite folds into its own Gather indices, leaving the identity.

Why separate from ``rewrite.py``: deciding which producers change and how is a whole-graph
pass run before the rewrite, with its own conditions; the rewrite only consults its result
(``producer_order``).
"""

from __future__ import annotations

import numpy as np

from ..ir.analysis import foldable_producer, gather_folds
from .permutation import _PermutationRules, is_identity


class _GatherFolding(_PermutationRules):
    """Adds the producer orders to the permutation rules; needs ``layers`` (plan by node name)."""

    # -- Gather elimination -------------------------------------------------------------
    def _producer_orders(self) -> dict[str, np.ndarray]:
        """Output channel order (possibly a subset) to impose on producers of pruned Convs (module doc)."""
        orders: dict[str, np.ndarray] = {}
        for node in self.graph.node:
            layer = self.layers.get(node.name)
            if layer is None or node.op_type != "Conv":
                continue
            producer = foldable_producer(self.index, node.name)
            if producer is None or producer in orders:
                continue
            producer_layer = self.layers.get(producer)
            indices = np.concatenate([np.asarray(k, dtype=np.int64) for k in layer.kept_in_channels])
            _, first = np.unique(indices, return_index=True)
            order = indices[np.sort(first)]
            if not gather_folds(1 if producer_layer is None else producer_layer.groups, len(order) == len(indices)):
                continue
            if len(order) == layer.c_in and is_identity(order):
                continue  # no Gather to remove
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
