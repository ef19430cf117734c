"""Equal-size filter clustering and the exact balanced assignment."""

import itertools
import time

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from onnxprune.gkp.clustering import (
    CLUSTERING_METHODS,
    balanced_assignment,
    balanced_kmeans,
    canonical_labels,
    cluster_filters,
)


def _cost(points, centroids, labels):
    return float(cdist(points, centroids, "sqeuclidean")[np.arange(len(points)), labels].sum())


def _brute_force_cost(points, centroids):
    n, g = len(points), len(centroids)
    cost = cdist(points, centroids, "sqeuclidean")
    best = np.inf
    for labels in itertools.product(range(g), repeat=n):
        if np.all(np.bincount(labels, minlength=g) == n // g):
            best = min(best, float(cost[np.arange(n), labels].sum()))
    return best


# --------------------------------------------------------------------------- balanced assignment


@pytest.mark.parametrize("groups", [2, 3])
def test_balanced_assignment_is_optimal_against_brute_force(groups):
    rng = np.random.default_rng(groups)
    for trial in range(25):
        dim = 1 + trial % 3
        points = rng.normal(size=(6, dim))
        if trial % 5 == 0:  # integer grid: many exact ties
            points = rng.integers(0, 3, size=(6, dim)).astype(float)
        centroids = rng.normal(size=(groups, dim)) * rng.uniform(0.2, 3.0)
        labels = balanced_assignment(points, centroids)
        assert labels.dtype == np.int64
        assert np.all(np.bincount(labels, minlength=groups) == 6 // groups)
        assert _cost(points, centroids, labels) == pytest.approx(_brute_force_cost(points, centroids), abs=1e-12)


def test_balanced_assignment_matches_linear_sum_assignment():
    rng = np.random.default_rng(11)
    for n, g in [(64, 8), (120, 6), (256, 16), (96, 2)]:
        points = rng.normal(size=(n, 5))
        # one centroid close to everything, the rest far away: forces many moves
        centroids = np.vstack([np.zeros((1, 5)), 6.0 + rng.normal(size=(g - 1, 5))])
        labels = balanced_assignment(points, centroids)
        assert np.all(np.bincount(labels, minlength=g) == n // g)
        cost = cdist(points, centroids, "sqeuclidean")
        rows, slots = linear_sum_assignment(np.repeat(cost, n // g, axis=1))
        optimum = float(cost[rows, slots // (n // g)].sum())
        assert _cost(points, centroids, labels) == pytest.approx(optimum, rel=1e-10)


def test_balanced_assignment_large_is_balanced_and_fast():
    rng = np.random.default_rng(12)
    points = rng.normal(size=(2048, 8))
    centroids = np.vstack([np.zeros((1, 8)), 4.0 + rng.normal(size=(7, 8))])
    start = time.perf_counter()
    labels = balanced_assignment(points, centroids)
    assert time.perf_counter() - start < 5.0
    assert np.all(np.bincount(labels, minlength=8) == 256)
    # no pair swap between two clusters can lower the cost (a necessary optimality check)
    cost = cdist(points, centroids, "sqeuclidean")
    own = cost[np.arange(2048), labels]
    for a in range(8):
        for b in range(a + 1, 8):
            ia, ib = labels == a, labels == b
            gain_a = cost[ia, b] - own[ia]  # moving a point of a to b
            gain_b = cost[ib, a] - own[ib]
            assert gain_a.min() + gain_b.min() >= -1e-9


def test_balanced_assignment_rejects_uneven_split():
    with pytest.raises(ValueError):
        balanced_assignment(np.zeros((7, 2)), np.zeros((2, 2)))


def test_balanced_kmeans_finds_separated_groups_and_is_seeded():
    rng = np.random.default_rng(13)
    truth = np.repeat(np.arange(4), 10)
    points = 10.0 * np.eye(4)[truth] + 0.1 * rng.normal(size=(40, 4))
    labels = balanced_kmeans(points, 4, seed=3)
    assert np.array_equal(canonical_labels(labels), truth)
    assert np.array_equal(balanced_kmeans(points, 4, seed=3), labels)


def test_canonical_labels():
    assert canonical_labels(np.array([2, 2, 0, 1, 0, 1])).tolist() == [0, 0, 1, 2, 1, 2]
    assert canonical_labels(np.array([5, 3, 3, 5])).dtype == np.int64


# --------------------------------------------------------------------------- cluster_filters


def _planted(n, groups, c_in, noise, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(groups, c_in * 9))
    truth = rng.permutation(np.repeat(np.arange(groups), n // groups))
    weight = (centres[truth] + noise * rng.normal(size=(n, c_in * 9))).reshape(n, c_in, 3, 3)
    return weight.astype(np.float32), canonical_labels(truth)


@pytest.mark.parametrize("method", CLUSTERING_METHODS)
def test_recovers_planted_groups(method):
    weight, truth = _planted(64, 8, 16, 0.3, seed=1)
    labels = cluster_filters(weight, 8, method, seed=0)
    assert labels.dtype == np.int64
    assert np.array_equal(labels, truth)


@pytest.mark.parametrize("method", CLUSTERING_METHODS)
def test_equal_size_canonical_and_deterministic(method):
    weight = np.random.default_rng(2).normal(size=(96, 8, 3, 3))
    labels = cluster_filters(weight, 6, method, seed=5)
    assert labels.shape == (96,)
    assert np.all(np.bincount(labels, minlength=6) == 16)
    assert np.array_equal(labels, canonical_labels(labels))
    assert cluster_filters(weight, 6, method, seed=5).tobytes() == labels.tobytes()


@pytest.mark.parametrize("method", CLUSTERING_METHODS)
def test_duplicate_filter_families(method):
    # exact duplicates in orthogonal families: the kNN graph has ties and falls apart
    families = np.repeat(np.arange(4), 4)
    weight = np.eye(8)[families * 2].reshape(16, 2, 2, 2)
    labels = cluster_filters(weight, 4, method)
    assert np.array_equal(labels, canonical_labels(families))


def test_trivial_group_counts():
    weight = np.random.default_rng(3).normal(size=(8, 4, 3, 3))
    for method in CLUSTERING_METHODS:
        assert cluster_filters(weight, 1, method).tolist() == [0] * 8
        assert cluster_filters(weight, 8, method).tolist() == list(range(8))


def test_rejects_bad_arguments():
    weight = np.zeros((12, 4, 3, 3))
    with pytest.raises(ValueError):
        cluster_filters(weight, 5, "kpca")
    with pytest.raises(ValueError):
        cluster_filters(weight, 4, "kmeans")
    with pytest.raises(ValueError):
        cluster_filters(weight, 0, "spectral")


def test_large_layer_runs_in_seconds():
    weight = np.random.default_rng(4).normal(size=(512, 64, 3, 3)).astype(np.float32)
    for method in CLUSTERING_METHODS:
        start = time.perf_counter()
        labels = cluster_filters(weight, 8, method)
        assert time.perf_counter() - start < 10.0
        assert np.all(np.bincount(labels) == 64)
