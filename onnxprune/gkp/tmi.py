"""Choosing a filter clustering by tickets magnitude increase (TMI-GKP step 2).

Rules:

* ``filter_tmi(W_f, W_e)[i] = Σ_j | |W_f[i,j]| − |W_e[i,j]| |`` — how much the magnitude of
  filter i moved between a snapshot e (from the early "ticket window" of training) and the
  final weights. Shapes must match.
* ``filter_magnitude(W_f)[i] = Σ_j |W_f[i,j]|`` — the data-free fallback ("large final")
  when no snapshots exist.
* ``gap_statistics``: per-cluster sum of the filter scores, sorted; the gaps between
  neighbours; their mean and (population) variance. G = 1 has no gap: (0, 0).
* ``rank_candidates``: rank every candidate by mean gap and by variance of gaps (1 = smallest);
  winner = smallest ``0.5·rank(mean) + rank(var)``. Why: the clustering whose clusters share
  the "lottery" mass most evenly (small, regular gaps) wins. Equal statistics share the
  smallest rank ("min" ranking, so that e.g. G = 2, where the variance is always 0, is decided
  by the mean gap instead of by list position); equal combined scores go to the candidate
  listed first. Statistics are compared exactly (they are computed the same way from the
  same scores, so identical clusterings give bit-identical statistics).
* ``choose_clustering``: with snapshots, one ranking round per snapshot on its TMI scores;
  the winner is the most frequent round winner, ties broken by the longest run of
  consecutive round wins (snapshots in the given order), then by candidate order. Without
  snapshots, a single round on ``filter_magnitude`` (criterion "magnitude").
"""

from __future__ import annotations

import numpy as np


def filter_tmi(w_final: np.ndarray, w_snapshot: np.ndarray) -> np.ndarray:
    """Per-filter Σ_j | |W_f| − |W_e| | as float64 [C_out]."""
    wf, we = np.asarray(w_final), np.asarray(w_snapshot)
    if wf.shape != we.shape:
        raise ValueError(f"snapshot shape {we.shape} does not match final weight shape {wf.shape}")
    wf, we = _as_filters(wf), _as_filters(we)
    return np.abs(np.abs(wf) - np.abs(we)).sum(axis=1)


def filter_magnitude(w_final: np.ndarray) -> np.ndarray:
    """Per-filter Σ_j |W_f| as float64 [C_out]."""
    return np.abs(_as_filters(np.asarray(w_final))).sum(axis=1)


def gap_statistics(labels: np.ndarray, filter_scores: np.ndarray, groups: int) -> tuple[float, float]:
    """(mean, variance) of the gaps between the sorted per-cluster score sums."""
    labels, scores = _check_labels(labels, filter_scores, groups)
    sums = np.sort(np.bincount(labels, weights=scores, minlength=groups))
    gaps = np.diff(sums)
    if gaps.size == 0:
        return 0.0, 0.0
    return float(gaps.mean()), float(gaps.var())


def rank_candidates(candidates: dict[str, np.ndarray], filter_scores: np.ndarray, groups: int) -> str:
    """Name of the candidate with the smallest 0.5·rank(mean gap) + rank(var gap)."""
    return _rank_round(candidates, filter_scores, groups)[0]


def choose_clustering(
    candidates: dict[str, np.ndarray], w_final: np.ndarray, snapshots: list[np.ndarray], groups: int
) -> tuple[str, dict]:
    """Pick one clustering; returns (winner, JSON-serialisable details)."""
    if not candidates:
        raise ValueError("no candidate clustering to choose from")
    names = list(candidates)
    snapshots = list(snapshots or [])
    if snapshots:
        criterion = "tmi"
        rounds = [filter_tmi(w_final, snap) for snap in snapshots]
    else:
        criterion = "magnitude"
        rounds = [filter_magnitude(w_final)]
    winners, means, variances = [], np.zeros(len(names)), np.zeros(len(names))
    for scores in rounds:
        winner, stats = _rank_round(candidates, scores, groups)
        winners.append(winner)
        means += [s[0] for s in stats]
        variances += [s[1] for s in stats]
    votes = {name: winners.count(name) for name in names}
    runs = {name: _longest_run(winners, name) for name in names}
    chosen = min(names, key=lambda name: (-votes[name], -runs[name], names.index(name)))
    details = {
        "criterion": criterion,
        "winner": chosen,
        "candidates": names,
        "n_rounds": len(rounds),
        "mean_gap": {name: float(v) for name, v in zip(names, means / len(rounds))},
        "var_gap": {name: float(v) for name, v in zip(names, variances / len(rounds))},
        "round_winners": winners,
        "votes": votes,
        "longest_run": runs,
    }
    return chosen, details


# --------------------------------------------------------------------------- helpers


def _as_filters(w: np.ndarray) -> np.ndarray:
    if w.ndim < 1 or w.shape[0] == 0:
        raise ValueError(f"expected a weight [C_out, ...], got shape {w.shape}")
    return w.reshape(w.shape[0], -1).astype(np.float64)


def _check_labels(labels, scores, groups) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and filter scores {scores.shape} must be 1-D and equal")
    if groups < 1 or labels.size and (labels.min() < 0 or labels.max() >= groups):
        raise ValueError(f"labels must lie in 0..{groups - 1}")
    return labels.astype(np.int64), scores


def _min_ranks(values: list[float]) -> list[int]:
    """1-based ranks, smallest value first; equal values share the smallest rank."""
    return [1 + sum(other < v for other in values) for v in values]


def _rank_round(candidates: dict, scores: np.ndarray, groups: int):
    names = list(candidates)
    if not names:
        raise ValueError("no candidate clustering to rank")
    stats = [gap_statistics(candidates[name], scores, groups) for name in names]
    mean_rank = _min_ranks([s[0] for s in stats])
    var_rank = _min_ranks([s[1] for s in stats])
    combined = [0.5 * m + v for m, v in zip(mean_rank, var_rank)]
    best = min(range(len(names)), key=lambda i: (combined[i], i))
    return names[best], stats


def _longest_run(sequence: list[str], name: str) -> int:
    best = run = 0
    for item in sequence:
        run = run + 1 if item == name else 0
        best = max(best, run)
    return best
