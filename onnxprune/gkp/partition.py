"""Disjoint grouped-kernel selection: every input channel is kept by exactly one group.

Why: when G·n_keep = C_in and the groups' kept channels partition the input, the Gather in
front of the grouped Conv is a pure permutation, which the rewrite folds into the producing
layer. ORT then keeps its fast blocked layout between layers (see README, "Speed").

Rule: the score of channel c for group g is the energy of its grouped kernel,
||W[filters of g, c]||², divided by group g's total energy (so groups with large filters do not
claim every channel). Channels are assigned to groups, n_keep = C_in / G each, by an exact
maximum-score balanced assignment (``scipy.optimize.linear_sum_assignment``).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def partition_input_channels(weight: np.ndarray, labels: np.ndarray, groups: int) -> list[list[int]]:
    """Kept input channels per group (sorted), forming a partition of range(C_in)."""
    c_in = weight.shape[1]
    if c_in % groups:
        raise ValueError(f"disjoint groups need C_in={c_in} divisible by groups={groups}")
    per_group = c_in // groups
    energy = np.stack([np.sum(weight[labels == g].astype(np.float64) ** 2, axis=(0, 2, 3))
                       for g in range(groups)])
    score = energy / np.maximum(energy.sum(axis=1, keepdims=True), 1e-300)
    slots, channels = linear_sum_assignment(-np.repeat(score, per_group, axis=0))
    owner = slots // per_group
    return [sorted(int(c) for c in channels[owner == g]) for g in range(groups)]
