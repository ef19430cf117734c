"""Greedy grouped-kernel selection against a plain-loop reference of the same rule."""

import math
import time

import numpy as np
import pytest

from onnxprune.gkp.kernel_selection import n_kept, quantised_similarity, select_grouped_kernels


# --------------------------------------------------------------------------- reference


def reference_select(group_weight, n_keep, lam="auto", starts=None):
    """Obviously-correct, slow version of the rule in onnxprune.gkp.kernel_selection."""
    c_in = group_weight.shape[1]
    kernels = []
    for c in range(c_in):
        kernels.append([float(v) for v in group_weight[:, c].ravel()])
    sim = [[0.0] * c_in for _ in range(c_in)]
    for i in range(c_in):
        for j in range(c_in):
            dist = math.sqrt(sum((a - b) ** 2 for a, b in zip(kernels[i], kernels[j])))
            sim[i][j] = 1.0 - dist
    if n_keep == c_in:
        return list(range(c_in))
    # documented integer grid: b = min(31, 52 - 2*ceil(log2 C)) - e, with max|S| < 2^e
    max_abs = max(abs(v) for row in sim for v in row)
    e = math.frexp(max_abs)[1]
    b = min(31, 52 - 2 * math.ceil(math.log2(max(c_in, 2)))) - e
    q = [[round(v * 2.0**b) for v in row] for row in sim]

    m = max(1, int(0.2 * n_keep))
    if lam == "auto":
        lam = (n_keep * (n_keep - 1) // 2) / ((c_in - n_keep) * m)
    best_cost, best_set = None, None
    for start in (range(c_in) if starts is None else starts):
        chosen = [start]
        acc = list(q[start])  # accumulated similarity of every kernel to the chosen ones
        while len(chosen) < n_keep:
            pick = None
            for j in range(c_in):
                if j not in chosen and (pick is None or acc[j] < acc[pick]):
                    pick = j
            chosen.append(pick)
            for j in range(c_in):
                acc[j] += q[pick][j]
        kept = sorted(chosen)
        pruned = [p for p in range(c_in) if p not in chosen]
        kept_pairs = 0
        for x in range(len(kept)):
            for y in range(x + 1, len(kept)):
                kept_pairs += q[kept[x]][kept[y]]
        pruned_close = 0
        for p in pruned:
            pruned_close += sum(sorted([q[p][k] for k in kept], reverse=True)[:m])
        cost = float(kept_pairs) - lam * float(pruned_close)
        if best_cost is None or cost < best_cost:
            best_cost, best_set = cost, kept
    return best_set


# --------------------------------------------------------------------------- n_kept


@pytest.mark.parametrize(
    "c_in,rate,expected",
    [(64, 0.4375, 36), (512, 0.4375, 288), (16, 0.4375, 9), (10, 0.0, 10), (10, 1.0, 1), (3, 0.5, 2), (5, 0.9, 1)],
)
def test_n_kept(c_in, rate, expected):
    assert n_kept(c_in, rate) == expected


@pytest.mark.parametrize("c_in,rate", [(0, 0.5), (8, -0.1), (8, 1.5), (2.5, 0.5)])
def test_n_kept_rejects_bad_input(c_in, rate):
    with pytest.raises(ValueError):
        n_kept(c_in, rate)


# --------------------------------------------------------------------------- against reference


def _random_cases():
    rng = np.random.default_rng(20220101)
    cases = []
    for idx in range(36):
        c_in = int(rng.integers(4, 41))
        k = (1, 3)[idx % 2]
        n_out = int(rng.integers(1, 9))
        n_keep = int(rng.integers(1, c_in + 1))
        lam = ("auto", 1.0, 2.0, 0.0)[idx % 4]
        scale = float(10.0 ** rng.uniform(-2, 0.5))
        w = (rng.normal(size=(n_out, c_in, k, k)) * scale).astype(np.float32)
        if idx % 3 == 0:  # duplicated channels: exact ties in greedy and cost
            src = rng.integers(0, c_in, size=c_in // 3)
            dst = rng.integers(0, c_in, size=c_in // 3)
            w[:, dst] = w[:, src]
        cases.append((w, n_keep, lam))
    return cases


@pytest.mark.parametrize("case", range(36))
def test_matches_reference(case):
    w, n_keep, lam = _random_cases()[case]
    got = select_grouped_kernels(w, n_keep, lam)
    assert got.dtype == np.int64
    assert got.tolist() == reference_select(w, n_keep, lam)


def test_mid_rate_sizes_match_reference():
    rng = np.random.default_rng(7)
    for c_in in (16, 32):
        w = rng.normal(size=(8, c_in, 3, 3)) * 0.1
        n = n_kept(c_in, 0.4375)
        assert select_grouped_kernels(w, n).tolist() == reference_select(w, n)


# --------------------------------------------------------------------------- edge cases


def test_keep_all_channels():
    w = np.random.default_rng(0).normal(size=(4, 7, 3, 3))
    assert select_grouped_kernels(w, 7).tolist() == list(range(7))


def test_keep_one_channel():
    w = np.random.default_rng(1).normal(size=(4, 9, 3, 3))
    # auto λ is 0 when one kernel is kept (no pairs): every cost is 0, lowest start wins
    assert select_grouped_kernels(w, 1).tolist() == [0]
    # with λ = 1 the kept kernel is the one the pruned kernels are most similar to
    got = select_grouped_kernels(w, 1, lam=1.0)
    assert got.tolist() == reference_select(w, 1, 1.0)
    kernels = np.moveaxis(w, 1, 0).reshape(9, -1)
    dist = np.linalg.norm(kernels[:, None] - kernels[None], axis=-1)
    assert got[0] == int(np.argmin(dist.sum(axis=0)))


def test_identical_kernels_pick_lowest_indices():
    w = np.ones((3, 10, 3, 3))
    assert select_grouped_kernels(w, 4).tolist() == [0, 1, 2, 3]


def test_duplicate_kernel_ties_are_deterministic():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(2, 12, 1, 1))
    w[:, 9] = w[:, 2]
    w[:, 11] = w[:, 5]
    first = select_grouped_kernels(w, 6)
    assert first.tolist() == reference_select(w, 6)
    assert select_grouped_kernels(w, 6).tobytes() == first.tobytes()
    # two identical kernels are never both kept: the second adds only similarity
    assert not ({2, 9} <= set(first.tolist()))


def test_spread_out_kernels_are_kept():
    # three tight families of channels: keeping 3 must take one from each family
    rng = np.random.default_rng(4)
    centres = np.array([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    family = np.repeat(np.arange(3), 4)
    kernels = centres[family] + 0.01 * rng.normal(size=(12, 3))
    w = kernels.T.reshape(3, 12, 1, 1)
    got = select_grouped_kernels(w, 3)
    assert sorted(family[got].tolist()) == [0, 1, 2]


def test_rejects_bad_arguments():
    w = np.zeros((2, 5, 3, 3))
    with pytest.raises(ValueError):
        select_grouped_kernels(w, 0)
    with pytest.raises(ValueError):
        select_grouped_kernels(w, 6)
    with pytest.raises(ValueError):
        select_grouped_kernels(w, 2, lam="big")
    with pytest.raises(ValueError):
        select_grouped_kernels(np.full((2, 5, 3, 3), np.nan), 2)


def test_quantised_similarity_is_close_to_float_similarity():
    rng = np.random.default_rng(5)
    kernels = rng.normal(size=(20, 18))
    q = quantised_similarity(kernels)
    sim = 1.0 - np.linalg.norm(kernels[:, None] - kernels[None], axis=-1)
    scale = float(q[0, 0])  # the diagonal is 1·2^b
    assert scale == 2.0 ** round(math.log2(scale)) and scale >= 2**20
    assert np.array_equal(q, q.T)
    assert np.max(np.abs(q / scale - sim)) <= 0.5 / scale + 1e-12


# --------------------------------------------------------------------------- speed


def test_512_channels_is_fast_and_deterministic():
    w = np.random.default_rng(6).normal(size=(64, 512, 3, 3)).astype(np.float32)
    start = time.perf_counter()
    got = select_grouped_kernels(w, 288)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"512-channel selection took {elapsed:.2f} s"
    assert got.size == 288 and np.all(np.diff(got) > 0)
    assert select_grouped_kernels(w, 288).tobytes() == got.tobytes()


def test_max_starts_at_or_above_c_in_is_the_exhaustive_rule():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((4, 40, 3, 3))
    full = select_grouped_kernels(w, 22)
    assert np.array_equal(select_grouped_kernels(w, 22, max_starts=40), full)
    capped = select_grouped_kernels(w, 22, max_starts=5)
    assert capped.shape == (22,) and len(set(capped.tolist())) == 22


def test_capped_starts_match_the_reference_restricted_to_those_starts():
    from onnxprune.gkp.kernel_selection import _start_kernels

    rng = np.random.default_rng(8)
    starts = _start_kernels(30, 4)
    assert starts.tolist() == [0, 10, 19, 29]
    for _ in range(5):
        w = rng.standard_normal((3, 30, 1, 1))
        got = select_grouped_kernels(w, 12, max_starts=4).tolist()
        assert got == reference_select(w, 12, starts=starts.tolist())
