"""Filter clustering into G groups of exactly C_out/G filters (TMI-GKP step 1).

A Conv weight ``W[C_out, C_in, kh, kw]`` is seen as ``C_out`` filters, i.e. the rows of
``W.reshape(C_out, -1)``. Three candidate clusterings are offered (the TMI criterion in
``onnxprune.gkp.tmi`` later picks one of them):

``kpca``
    Kernel PCA with the precomputed kernel ``K = 0.5*(X Xᵀ)² + 0.5*exp(-gamma*|x-y|²)``
    over the L2-normalised filters ``X``, embedded into ``min(G, C_out-1)`` dimensions,
    then equal-size k-means. Why normalise: with raw weights the squared linear term grows
    with the 4th power of the weight scale and swamps the RBF term; on unit rows the
    polynomial term lies in [0, 1] and the RBF term in [e^-4, 1]. ``gamma = 1.0`` on unit
    rows is exactly sklearn's default ``gamma = 1/n_features`` applied to rows rescaled to
    norm ``sqrt(n_features)`` (every feature of unit RMS), so it is the "default" scale
    without depending on the layer size.
``spectral``
    Cosine distance between L2-normalised filters, mutual-kNN graph with
    ``k = min(16, C_out-1)`` (neighbour ties broken by the lower filter index) whose edges
    carry heat-kernel weights ``exp(-d²/σ²)``, σ = median distance of a filter to its k
    neighbours (why weights: with k = 16 and only 8 filters per group, every filter's
    neighbour list must reach into other groups, and a binary graph cannot tell those
    edges apart; on planted clusters of 8 this lifts recovery from ARI 0.88 to 1.0), the ``G``
    eigenvectors of the smallest eigenvalues of the symmetric normalised Laplacian, rows
    normalised to unit length (Ng-Jordan-Weiss), then equal-size k-means. If the mutual
    graph is disconnected we fall back to the symmetrised kNN graph, and if that is still
    disconnected a uniform epsilon (1e-6) edge is added between every pair, so that the
    embedding is always well defined.
``density``
    Equal-size density clustering: PCA of the normalised filters to ``<= 8`` dimensions,
    DBSCAN (``min_samples = max(2, min(5, C_out/G))``) over a grid of ``eps`` values (the
    5%..95% quantiles of every filter's distance to its ``min_samples``-th neighbour). The
    labelling kept is the one whose clusters best seed G equal groups: first the number of
    clusters closest to G, then the fewest filters that are noise or exceed/miss the
    target size in the G largest clusters, then the smaller eps. Its G largest clusters
    give the centroids (means in the embedding); if there are fewer than G, the missing
    ones come from k-means++ seeding (distance² to the centroids already chosen). The
    labels are the exact balanced assignment of all filters to those centroids (one
    shot, no Lloyd refinement: the density structure, not k-means, defines the groups).

Equal size is a hard constraint (a grouped Conv needs C_out/G filters per group), so every
method ends in the exact balanced assignment of ``balanced.py``: ``kpca`` and ``spectral``
through its equal-size k-means, ``density`` through one assignment to its centroids.

Determinism: all randomness comes from ``default_rng(seed)``, all argmin/argsort ties go to
the lowest index (stable sorts), distances come from ``scipy.spatial.distance.cdist``
(plain loops, no BLAS), and the BLAS/LAPACK parts (Gram matrices, eigh) run under a
one-thread limit so the result does not depend on the machine's thread count. Final labels
are canonicalised: cluster ids are renumbered in the order of their smallest filter index,
so equal partitions compare equal.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import eigh
from scipy.sparse.csgraph import connected_components
from scipy.spatial.distance import cdist
from threadpoolctl import threadpool_limits

from .balanced import _check_groups, _kmeans_pp, balanced_assignment, balanced_kmeans

CLUSTERING_METHODS = ("kpca", "spectral", "density")

_KPCA_GAMMA = 1.0  # on unit-norm rows == sklearn's 1/n_features on unit-RMS features
_SPECTRAL_K = 16
_EPS_CONNECT = 1e-6
_DENSITY_DIMS = 8
_DENSITY_QUANTILES = np.linspace(0.05, 0.95, 19)


# --------------------------------------------------------------------------- public API


def cluster_filters(weight: np.ndarray, groups: int, method: str, seed: int = 0) -> np.ndarray:
    """Cluster the C_out filters of ``weight`` into ``groups`` groups of equal size.

    Returns canonical int64 labels (length C_out, values 0..groups-1, each used exactly
    C_out/groups times). Raises ValueError on a bad method, groups, or shape.
    """
    if method not in CLUSTERING_METHODS:
        raise ValueError(f"unknown clustering method {method!r}; use one of {CLUSTERING_METHODS}")
    filters = _filters_matrix(weight)
    n = filters.shape[0]
    groups = _check_groups(n, groups)
    if groups == 1:
        return np.zeros(n, dtype=np.int64)
    if groups == n:
        return np.arange(n, dtype=np.int64)
    with threadpool_limits(limits=1):
        if method == "kpca":
            labels = balanced_kmeans(_kpca_embedding(filters, groups, seed), groups, seed)
        elif method == "spectral":
            labels = balanced_kmeans(_spectral_embedding(filters, groups), groups, seed)
        else:
            labels = _density_labels(filters, groups, seed)
    return canonical_labels(labels)


def canonical_labels(labels: np.ndarray) -> np.ndarray:
    """Renumber clusters in the order of their smallest member index (int64)."""
    labels = np.asarray(labels)
    values, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(values.size, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(values.size, dtype=np.int64)
    return rank[inverse.ravel()]


# --------------------------------------------------------------------------- validation


def _filters_matrix(weight: np.ndarray) -> np.ndarray:
    w = np.asarray(weight)
    if w.ndim < 2:
        raise ValueError(f"expected a Conv weight [C_out, C_in, kh, kw], got shape {w.shape}")
    filters = w.reshape(w.shape[0], -1).astype(np.float64)
    if filters.shape[0] == 0 or filters.shape[1] == 0:
        raise ValueError(f"empty weight of shape {w.shape}")
    if not np.isfinite(filters).all():
        raise ValueError("weight contains NaN or infinity")
    return filters


def _normalise_rows(x: np.ndarray) -> np.ndarray:
    """Unit-L2 rows; an all-zero row stays zero (it has no direction)."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    return x / np.where(norms > 0, norms, 1.0)[:, None]


# --------------------------------------------------------------------------- embeddings


def _kpca_embedding(filters: np.ndarray, groups: int, seed: int) -> np.ndarray:
    from sklearn.decomposition import KernelPCA

    x = _normalise_rows(filters)
    lin = x @ x.T
    kernel = 0.5 * lin**2 + 0.5 * np.exp(-_KPCA_GAMMA * cdist(x, x, metric="sqeuclidean"))
    kernel = 0.5 * (kernel + kernel.T)
    dims = min(groups, filters.shape[0] - 1)
    kpca = KernelPCA(n_components=dims, kernel="precomputed", eigen_solver="dense", random_state=seed)
    return kpca.fit_transform(kernel)


def _knn_graph(dist: np.ndarray, k: int) -> np.ndarray:
    """Boolean directed kNN graph (self excluded, neighbour ties → lower index)."""
    d = dist.copy()
    np.fill_diagonal(d, np.inf)
    nbrs = np.argsort(d, axis=1, kind="stable")[:, :k]
    graph = np.zeros(d.shape, dtype=bool)
    graph[np.arange(d.shape[0])[:, None], nbrs] = True
    return graph


def _connected(adjacency: np.ndarray) -> bool:
    return connected_components(adjacency, directed=False)[0] == 1


def _heat_kernel(dist: np.ndarray, knn: np.ndarray) -> np.ndarray:
    """Edge weights exp(-d²/σ²), σ = median distance of a filter to its kNN neighbours."""
    sigma = float(np.median(dist[knn]))
    if sigma <= 0:
        return np.ones_like(dist)
    return np.maximum(np.exp(-((dist / sigma) ** 2)), 1e-12)  # no edge may underflow to 0


def _spectral_embedding(filters: np.ndarray, groups: int) -> np.ndarray:
    x = _normalise_rows(filters)
    n = x.shape[0]
    cos_dist = np.clip(1.0 - x @ x.T, 0.0, 2.0)
    knn = _knn_graph(cos_dist, min(_SPECTRAL_K, n - 1))
    graph = knn & knn.T
    if not _connected(graph):
        graph = knn | knn.T
    adjacency = np.where(graph, _heat_kernel(cos_dist, knn), 0.0)
    if not _connected(graph):
        adjacency = adjacency + _EPS_CONNECT
        np.fill_diagonal(adjacency, 0.0)
    deg_isqrt = 1.0 / np.sqrt(adjacency.sum(axis=1))
    laplacian = np.eye(n) - deg_isqrt[:, None] * adjacency * deg_isqrt[None, :]
    laplacian = 0.5 * (laplacian + laplacian.T)
    _, vecs = eigh(laplacian, subset_by_index=[0, groups - 1])
    return _normalise_rows(vecs)


# --------------------------------------------------------------------------- density


def _pca_embedding(filters: np.ndarray, dims: int) -> np.ndarray:
    x = _normalise_rows(filters)
    x = x - x.mean(axis=0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    return u[:, :dims] * s[:dims]


def _density_labels(filters: np.ndarray, groups: int, seed: int) -> np.ndarray:
    from sklearn.cluster import DBSCAN

    n = filters.shape[0]
    cap = n // groups
    z = _pca_embedding(filters, min(_DENSITY_DIMS, n - 1, filters.shape[1]))
    dist = cdist(z, z)
    min_samples = max(2, min(5, cap))
    kth = np.sort(dist, axis=1)[:, min(min_samples, n - 1)]  # column 0 is the point itself
    best_key, best_labels = None, None
    for eps in np.unique(np.quantile(kth, _DENSITY_QUANTILES)):
        if eps <= 0:
            continue
        found = DBSCAN(eps=float(eps), min_samples=min_samples, metric="precomputed").fit_predict(dist)
        key = _density_score(found, groups, cap)
        if best_key is None or key < best_key:  # strict: smaller eps wins ties
            best_key, best_labels = key, found
    seeds = _density_centroids(z, best_labels, groups)
    rng = np.random.default_rng(seed)
    centroids = _kmeans_pp(z, groups, rng, seeds) if len(seeds) else _kmeans_pp(z, groups, rng)
    return balanced_assignment(z, centroids)


def _cluster_sizes(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cluster ids (noise excluded) sorted by size desc, ties by id; and their sizes."""
    ids, sizes = np.unique(labels[labels >= 0], return_counts=True)
    order = np.lexsort((ids, -sizes))
    return ids[order], sizes[order]


def _density_score(labels: np.ndarray, groups: int, cap: int) -> tuple[int, int]:
    _, sizes = _cluster_sizes(labels)
    top = sizes[:groups]
    misplaced = int((labels < 0).sum()) + int(np.abs(top - cap).sum()) + int(sizes[groups:].sum())
    return abs(sizes.size - groups), misplaced


def _density_centroids(z: np.ndarray, labels, groups: int) -> list[np.ndarray]:
    if labels is None:
        return []
    ids, _ = _cluster_sizes(labels)
    return [z[labels == i].mean(axis=0) for i in ids[:groups]]
