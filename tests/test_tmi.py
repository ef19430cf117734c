"""Tickets magnitude increase: scores, gap statistics, ranking and the vote."""

import json

import numpy as np
import pytest

from onnxprune.gkp.tmi import (
    choose_clustering,
    filter_magnitude,
    filter_tmi,
    gap_statistics,
    rank_candidates,
)


def test_filter_tmi_and_magnitude_by_hand():
    w_final = np.array([[[[1.0, -2.0]]], [[[0.5, 0.0]]]])  # [2, 1, 1, 2]
    w_snap = np.array([[[[-3.0, 2.0]]], [[[0.0, -1.0]]]])
    # filter 0: | 1 - 3 | + | 2 - 2 | = 2 ; filter 1: | .5 - 0 | + | 0 - 1 | = 1.5
    assert filter_tmi(w_final, w_snap).tolist() == [2.0, 1.5]
    assert filter_magnitude(w_final).tolist() == [3.0, 0.5]
    assert filter_tmi(w_final, w_final).tolist() == [0.0, 0.0]


def test_filter_tmi_shape_mismatch():
    with pytest.raises(ValueError):
        filter_tmi(np.zeros((4, 2, 3, 3)), np.zeros((4, 2, 1, 1)))


def test_gap_statistics_by_hand():
    labels = np.array([0, 0, 1, 1, 2, 2])
    scores = np.array([1.0, 2.0, 3.0, 4.0, 10.0, 0.0])
    # cluster sums 3, 7, 10 → gaps 4, 3 → mean 3.5, variance 0.25
    assert gap_statistics(labels, scores, 3) == (3.5, 0.25)
    assert gap_statistics(np.zeros(4, dtype=int), np.ones(4), 1) == (0.0, 0.0)
    with pytest.raises(ValueError):
        gap_statistics(np.array([0, 3]), np.ones(2), 3)
    with pytest.raises(ValueError):
        gap_statistics(np.array([0, 1, 1]), np.ones(2), 2)


def _expected_winner(stats):
    """Independent statement of the rule: min ranks, 0.5·mean + var, first on ties."""
    means = [s[0] for s in stats]
    variances = [s[1] for s in stats]
    scores = []
    for m, v in zip(means, variances):
        mean_rank = 1 + sorted(means).index(m)
        var_rank = 1 + sorted(variances).index(v)
        scores.append(0.5 * mean_rank + var_rank)
    return scores.index(min(scores))


def test_rank_candidates_follows_the_weighted_rank_rule():
    rng = np.random.default_rng(0)
    disagreements = 0
    for _ in range(60):
        scores = rng.exponential(size=24)
        candidates = {f"c{k}": rng.permutation(np.repeat(np.arange(4), 6)) for k in range(4)}
        stats = [gap_statistics(lab, scores, 4) for lab in candidates.values()]
        winner = rank_candidates(candidates, scores, 4)
        assert winner == f"c{_expected_winner(stats)}"
        disagreements += winner != f"c{int(np.argmin([s[0] for s in stats]))}"
    assert disagreements > 0  # the variance term really changes some outcomes


def test_rank_candidates_ties_go_to_first_listed():
    labels = np.repeat(np.arange(3), 2)
    scores = np.arange(6.0)
    assert rank_candidates({"b": labels, "a": labels.copy()}, scores, 3) == "b"
    assert rank_candidates({"a": labels, "b": labels.copy()}, scores, 3) == "a"


def test_two_groups_decided_by_mean_gap_not_by_position():
    # with G = 2 the variance of the single gap is always 0: the mean gap must decide
    uneven = np.array([0, 0, 1, 1])
    even = np.array([0, 1, 0, 1])
    scores = np.array([1.0, 1.0, 0.0, 0.0])
    assert rank_candidates({"uneven": uneven, "even": even}, scores, 2) == "even"


# --------------------------------------------------------------------------- choose_clustering

A = np.array([0, 0, 1, 1])
B = np.array([0, 1, 0, 1])
A_WINS = [1.0, 0.0, 1.0, 0.0]  # TMI per filter: A's clusters both sum to 1
B_WINS = [1.0, 1.0, 0.0, 0.0]


def _setup(pattern):
    """Final weight whose filters have Σ|W| = 1, and snapshots with the given TMI vectors."""
    w_final = np.full((4, 2, 1, 1), 0.5)
    snapshots = [w_final * (1.0 - np.array(t))[:, None, None, None] for t in pattern]
    return w_final, snapshots


@pytest.mark.parametrize(
    "pattern,winner",
    [
        ([B_WINS, A_WINS, B_WINS], "B"),  # majority
        ([A_WINS, B_WINS, B_WINS, A_WINS], "B"),  # 2-2, B has the longer run
        ([B_WINS, A_WINS, B_WINS, A_WINS], "A"),  # 2-2, equal runs: candidate order
        ([A_WINS, A_WINS, B_WINS, B_WINS, B_WINS], "B"),
    ],
)
def test_choose_clustering_votes(pattern, winner):
    w_final, snapshots = _setup(pattern)
    chosen, details = choose_clustering({"A": A, "B": B}, w_final, snapshots, 2)
    assert chosen == winner
    assert details["criterion"] == "tmi"
    expected_rounds = ["A" if t is A_WINS else "B" for t in pattern]
    assert details["round_winners"] == expected_rounds
    assert details["votes"] == {"A": expected_rounds.count("A"), "B": expected_rounds.count("B")}
    assert details["winner"] == winner
    json.dumps(details)


def test_choose_clustering_averages_statistics():
    w_final, snapshots = _setup([A_WINS, B_WINS])
    _, details = choose_clustering({"A": A, "B": B}, w_final, snapshots, 2)
    # A's gap: 0 then 2 → mean 1; B's gap: 2 then 0 → mean 1
    assert details["mean_gap"] == {"A": 1.0, "B": 1.0}
    assert details["var_gap"] == {"A": 0.0, "B": 0.0}
    assert details["n_rounds"] == 2


def test_choose_clustering_without_snapshots_uses_magnitude():
    w_final = np.array([3.0, 3.0, 1.0, 1.0]).reshape(4, 1, 1, 1)
    chosen, details = choose_clustering({"A": A, "B": B}, w_final, [], 2)
    assert chosen == "B"  # B pairs a large with a small filter: sums 4 and 4
    assert details["criterion"] == "magnitude"
    assert details["round_winners"] == ["B"]
    assert details["mean_gap"] == {"A": 4.0, "B": 0.0}
    assert json.loads(json.dumps(details)) == details


def test_choose_clustering_rejects_empty_and_mismatch():
    with pytest.raises(ValueError):
        choose_clustering({}, np.ones((4, 1, 1, 1)), [], 2)
    with pytest.raises(ValueError):
        choose_clustering({"A": A}, np.ones((4, 1, 1, 1)), [np.ones((4, 2, 1, 1))], 2)
