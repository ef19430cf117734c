"""Equal-size clustering primitives: the exact balanced assignment and equal-size k-means.

Equal size is a hard constraint (a grouped Conv needs C_out/G filters per group), so every
clustering method ends in :func:`balanced_assignment`, an EXACT min-cost assignment of the N points to
``G·(N/G)`` centroid slots (cost = squared euclidean distance). It is solved as a
transportation problem with G sink nodes by successive shortest paths: start from the
unconstrained nearest-centroid assignment (optimal, no negative cycles), then move one unit
at a time from over-full to under-full clusters along a shortest path in the residual graph
between clusters (Bellman-Ford over G nodes; the edge a→b costs the cheapest move of one of
a's points to b). This gives the same optimum as ``scipy.optimize.linear_sum_assignment``
on the N×N slot matrix (tested), but is ~100x faster at N = 2048 (that N×N LSA takes ~1 s
per call, far too slow inside Lloyd iterations).

Equal-size k-means = Lloyd iterations whose assignment step is the balanced assignment;
k-means++ initialisation from ``np.random.default_rng(seed)``, ``n_init`` restarts, the
lowest inertia wins (the first one on exact ties), stop when the labels stop changing or
after ``max_iter`` iterations.

Why separate from ``clustering.py``: these are generic solvers on points (no Conv, no filters),
proved against brute force and ``linear_sum_assignment`` on their own; ``clustering.py`` builds
the filter embeddings they run on. Ties in every argmin go to the lowest index, distances come
from ``scipy.spatial.distance.cdist`` (no BLAS), so a seed fixes the result.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.distance import cdist

from ..errors import InternalError


# --------------------------------------------------------------------------- public API


def balanced_assignment(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Exact min-cost assignment of N points to G centroids, N/G points each.

    Cost = Σ squared euclidean distance point→its centroid. Returns int64 labels indexing
    ``centroids`` (not canonicalised). Raises ValueError if N % G != 0.
    """
    points = np.asarray(points, dtype=np.float64)
    centroids = np.asarray(centroids, dtype=np.float64)
    if points.ndim != 2 or centroids.ndim != 2 or points.shape[1] != centroids.shape[1]:
        raise ValueError("points [N, d] and centroids [G, d] must be 2-D with the same d")
    n, g = points.shape[0], centroids.shape[0]
    if g < 1 or n % g != 0:
        raise ValueError(f"{n} points cannot be split evenly over {g} centroids")
    cost = cdist(points, centroids, metric="sqeuclidean")
    return _balanced_from_cost(cost, n // g)


def balanced_kmeans(
    points: np.ndarray, groups: int, seed: int = 0, n_init: int = 4, max_iter: int = 50
) -> np.ndarray:
    """Equal-size k-means: Lloyd iterations with the exact balanced assignment step.

    Returns int64 labels (not canonicalised) of the run with the lowest inertia.
    """
    points = np.asarray(points, dtype=np.float64)
    n = points.shape[0]
    groups = _check_groups(n, groups)
    rng = np.random.default_rng(seed)
    best_labels, best_inertia = None, np.inf
    for _ in range(n_init):
        labels, inertia = _lloyd_balanced(points, _kmeans_pp(points, groups, rng), max_iter)
        if inertia < best_inertia:
            best_labels, best_inertia = labels, inertia
    return best_labels


def _check_groups(n: int, groups: int) -> int:
    if isinstance(groups, bool) or int(groups) != groups or groups < 1:
        raise ValueError(f"groups must be a positive integer, got {groups!r}")
    groups = int(groups)
    if n % groups != 0:
        raise ValueError(f"C_out = {n} is not divisible by groups = {groups}")
    return groups


# --------------------------------------------------------------------------- balanced assignment


def _balanced_from_cost(cost: np.ndarray, cap: int) -> np.ndarray:
    """Min-cost assignment with exactly ``cap`` points per column, by successive shortest paths.

    Invariant: the residual graph between clusters has no negative cycle (true for the
    nearest-centroid start, kept by augmenting along shortest paths), so the final
    assignment is optimal among all balanced ones.
    """
    n, g = cost.shape
    labels = np.argmin(cost, axis=1).astype(np.int64)
    counts = np.bincount(labels, minlength=g)
    if np.all(counts == cap):
        return labels
    tol = 1e-12 * max(1.0, float(np.abs(cost).max()))
    move_cost = np.full((g, g), np.inf)
    move_point = np.zeros((g, g), dtype=np.int64)
    for a in range(g):
        _refresh_moves(cost, labels, a, move_cost, move_point)
    while True:
        over = counts > cap
        if not over.any():
            return labels
        dist, pred = _bellman_ford(move_cost, over, tol)
        target = int(np.argmin(np.where(counts < cap, dist, np.inf)))
        if not np.isfinite(dist[target]):  # cannot happen: every cluster can take any point
            raise InternalError("balanced assignment: no augmenting path")
        path = _walk_back(pred, target)
        moved = [(int(move_point[a, b]), b) for a, b in zip(path[:-1], path[1:])]
        for point, b in moved:
            labels[point] = b
        counts[path[0]] -= 1
        counts[target] += 1
        for a in path:
            _refresh_moves(cost, labels, a, move_cost, move_point)


def _refresh_moves(cost, labels, a, move_cost, move_point) -> None:
    """Cheapest move of one point of cluster ``a`` to every other cluster (ties: lowest index)."""
    members = np.flatnonzero(labels == a)
    if members.size == 0:
        move_cost[a] = np.inf
        return
    extra = cost[members] - cost[members, a][:, None]
    best = np.argmin(extra, axis=0)
    move_cost[a] = extra[best, np.arange(cost.shape[1])]
    move_point[a] = members[best]
    move_cost[a, a] = np.inf


def _bellman_ford(weights: np.ndarray, sources: np.ndarray, tol: float):
    """Shortest distances from any source node over G nodes; relax only on a gain > tol."""
    g = weights.shape[0]
    dist = np.where(sources, 0.0, np.inf)
    pred = np.full(g, -1, dtype=np.int64)
    cols = np.arange(g)
    for _ in range(max(1, g - 1)):
        cand = dist[:, None] + weights
        via = np.argmin(cand, axis=0)
        best = cand[via, cols]
        better = best < dist - tol
        if not better.any():
            break
        dist[better] = best[better]
        pred[better] = via[better]
    return dist, pred


def _walk_back(pred: np.ndarray, target: int) -> list[int]:
    path = [target]
    while pred[path[-1]] != -1:
        path.append(int(pred[path[-1]]))
        if len(path) > pred.size:
            raise InternalError("balanced assignment: cycle in shortest-path tree")
    return path[::-1]


# --------------------------------------------------------------------------- k-means


def _kmeans_pp(points: np.ndarray, k: int, rng: np.random.Generator, centroids=None) -> np.ndarray:
    """k-means++ seeding (D² sampling); extends ``centroids`` if given. Deterministic per rng."""
    chosen = [] if centroids is None else [np.asarray(c, dtype=np.float64) for c in centroids]
    if not chosen:
        chosen.append(points[int(rng.integers(points.shape[0]))])
    d2 = cdist(points, np.asarray(chosen), metric="sqeuclidean").min(axis=1)
    while len(chosen) < k:
        total = float(d2.sum())
        if total > 0:
            idx = int(np.searchsorted(np.cumsum(d2), rng.random() * total, side="right"))
            idx = min(idx, points.shape[0] - 1)
        else:  # every point sits on a centroid already: any point will do
            idx = int(rng.integers(points.shape[0]))
        chosen.append(points[idx])
        d2 = np.minimum(d2, cdist(points, points[idx : idx + 1], metric="sqeuclidean")[:, 0])
    return np.asarray(chosen)


def _lloyd_balanced(points: np.ndarray, centroids: np.ndarray, max_iter: int):
    g = centroids.shape[0]
    cap = points.shape[0] // g
    labels = None
    for _ in range(max_iter):
        new = balanced_assignment(points, centroids)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        order = np.argsort(labels, kind="stable")
        centroids = points[order].reshape(g, cap, -1).mean(axis=1)
    cost = cdist(points, centroids, metric="sqeuclidean")
    return labels, float(cost[np.arange(points.shape[0]), labels].sum())
