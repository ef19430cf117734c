"""Least squares on convolution im2col rows: the pure-numpy mathematics of the calibration refit.

Why apart from ``calibrate``: these functions see only arrays (inputs, targets, kernels) — the
one exception, ``ConvGeometry.of``, reads a Conv node's attributes — and know nothing of
sessions or plans, so they can be tested on synthetic data and are
shared by the refit (``calibrate.refit_weights``) and the sensitivity curves
(``sensitivity.measure``).

- ``ConvGeometry`` / ``im2col``: a Conv's rows, honouring stride, pads, dilation and kernel size;
- ``Moments`` / ``accumulate``: sufficient statistics ``XᵀX, XᵀY, ΣX, ΣY, ΣY²`` over batches of
  rows, so memory does not grow with the number of spatial positions;
- ``solve_group`` / ``fit_group`` / ``squared_error``: ridge least squares towards the original
  kernels with a free bias, the ridge validated on held-out inputs (``RIDGE_GRID``);
- ``greedy_channels``: data-aware kept channels by block forward selection on the moments.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import scipy.linalg

from ..errors import InternalError
from ..ir.graph import get_attr

DEFAULT_RIDGE = 1e-2  # λ relative to the mean variance of a group's im2col columns
RIDGE_GRID = (1.0, 10.0, 100.0, 1e3, 1e4)  # × DEFAULT_RIDGE; 1e4 is ~"original kernels, new bias"
STATS_BATCH = 64  # samples per statistics batch (bounds the im2col rows held at once)
GREEDY_BUDGET = 2e10  # flops (groups·n_keep·D²·k²) above this: one-shot channel ranking, not greedy
GREEDY_STEPS = 96  # layers wider than this add C_in/GREEDY_STEPS channels per greedy step (narrower: one)


@dataclass
class ConvGeometry:
    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right

    @classmethod
    def of(cls, node: onnx.NodeProto, kernel, in_hw) -> "ConvGeometry":
        strides = tuple(get_attr(node, "strides", [1, 1]))
        dilations = tuple(get_attr(node, "dilations", [1, 1]))
        auto_pad = get_attr(node, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            pads = [0, 0, 0, 0]
            for a in range(2):
                out = -(-in_hw[a] // strides[a])
                total = max(0, (out - 1) * strides[a] + dilations[a] * (kernel[a] - 1) + 1 - in_hw[a])
                small, big = total // 2, total - total // 2
                pads[a], pads[a + 2] = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
        elif auto_pad == "VALID":
            pads = [0, 0, 0, 0]
        else:
            pads = list(get_attr(node, "pads", [0, 0, 0, 0]))
        return cls(tuple(kernel), strides, dilations, tuple(pads))


def im2col(x: np.ndarray, geo: ConvGeometry) -> np.ndarray:
    """[B, C, H, W] -> rows [B·Ho·Wo, C·kh·kw], columns ordered like ``W.reshape(C_out, -1)``."""
    (kh, kw), (sh, sw), (dh, dw), (pt, pl, pb, pr) = geo.kernel, geo.strides, geo.dilations, geo.pads
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr))) if any(geo.pads) else x
    b, c, h, w = xp.shape
    ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((b, ho, wo, c, kh, kw), dtype=np.float32)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i * dh:i * dh + sh * (ho - 1) + 1:sh, j * dw:j * dw + sw * (wo - 1) + 1:sw]
            cols[..., i, j] = patch.transpose(0, 2, 3, 1)
    return cols.reshape(b * ho * wo, c * kh * kw)


@dataclass
class Moments:
    """Sufficient statistics of (im2col rows X, outputs Y) for least squares, in float64."""
    n: int
    sx: np.ndarray  # [D]
    xx: np.ndarray  # [D, D]
    xy: np.ndarray  # [D, C_out]
    sy: np.ndarray  # [C_out]
    yy: np.ndarray  # [C_out]

    def __add__(self, other: "Moments") -> "Moments":
        return Moments(self.n + other.n, self.sx + other.sx, self.xx + other.xx, self.xy + other.xy,
                       self.sy + other.sy, self.yy + other.yy)


def accumulate(x: np.ndarray, y: np.ndarray, channels: np.ndarray, geo: ConvGeometry,
               batch: int = STATS_BATCH) -> Moments:
    """Moments over all rows, ``batch`` samples at a time (bounded memory).

    Only the input ``channels`` that some group keeps are expanded.
    """
    d, c_out = len(channels) * geo.kernel[0] * geo.kernel[1], y.shape[1]
    m = Moments(0, np.zeros(d), np.zeros((d, d)), np.zeros((d, c_out)), np.zeros(c_out), np.zeros(c_out))
    for start in range(0, len(x), batch):
        cols = im2col(np.asarray(x[start:start + batch][:, channels], dtype=np.float32), geo)
        rows = np.ascontiguousarray(y[start:start + batch].transpose(0, 2, 3, 1), dtype=np.float32)
        rows = rows.reshape(-1, c_out)
        if len(rows) != len(cols):
            raise InternalError(f"im2col gives {len(cols)} rows, the Conv output {len(rows)}")
        m.n += len(rows)
        m.sx += cols.sum(axis=0, dtype=np.float64)
        m.xx += cols.T @ cols
        m.xy += cols.T @ rows
        m.sy += rows.sum(axis=0, dtype=np.float64)
        m.yy += np.einsum("ij,ij->j", rows, rows, dtype=np.float64)
    return m


def squared_error(m: Moments, idx: np.ndarray, rows: np.ndarray, w: np.ndarray, b: np.ndarray) -> float:
    """Σ over rows and filters of (y - x·w - b)², from the moments (w: [d, r], b: [r])."""
    xx, xy, sx = m.xx[np.ix_(idx, idx)], m.xy[np.ix_(idx, rows)], m.sx[idx]
    total = (m.yy[rows].sum() - 2 * np.sum(w * xy) - 2 * b @ m.sy[rows] + np.sum(w * (xx @ w))
             + 2 * b @ (sx @ w) + m.n * b @ b)
    return max(float(total), 0.0)


def solve_group(m: Moments, idx: np.ndarray, rows: np.ndarray, w0: np.ndarray, ridge: float):
    """Ridge towards ``w0`` with a free bias: returns (w [d, r], b [r])."""
    mu, my = m.sx[idx] / m.n, m.sy[rows] / m.n
    cov = m.xx[np.ix_(idx, idx)] / m.n - np.outer(mu, mu)
    cross = m.xy[np.ix_(idx, rows)] / m.n - np.outer(mu, my)
    lam = ridge * max(np.trace(cov) / len(idx), 1e-12)
    try:
        w = scipy.linalg.solve(cov + lam * np.eye(len(idx)), cross + lam * w0, assume_a="pos")
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError, ValueError):
        w = np.linalg.lstsq(cov + lam * np.eye(len(idx)), cross + lam * w0, rcond=None)[0]
    return w, my - mu @ w


def fit_group(m: Moments, m_train, m_val, idx, rows, w0, b0, ridge: float):
    """(w, b, e_pruned, e_refit, score, ridge) for one group and one kept set.

    ``score`` ranks kept sets: the validation error when ``m_val`` is given (ridge chosen on it
    from ``ridge × RIDGE_GRID``), else the error on all rows. The final fit uses all rows, and
    is replaced by ``(w0, b0)`` in the (round-off) case it is worse than plain pruning.
    """
    lam, score = ridge, None
    if m_val is not None:
        for factor in RIDGE_GRID:
            w, b = solve_group(m_train, idx, rows, w0, ridge * factor)
            err = squared_error(m_val, idx, rows, w, b)
            if score is None or err < score:
                lam, score = ridge * factor, err
    w, b = solve_group(m, idx, rows, w0, lam)
    e0, e1 = squared_error(m, idx, rows, w0, b0), squared_error(m, idx, rows, w, b)
    if not e1 <= e0:  # never worse than plain pruning on the calibration rows
        w, b, e1 = w0, b0, e0
    return w, b, e0, e1, e1 if score is None else score, lam


def greedy_channels(m: Moments, rows: np.ndarray, k2: int, n_keep: int, ridge: float,
                    greedy: bool = True, nested: bool = False, chunk: int = 1) -> list[int]:
    """Data-aware grouped-kernel choice: greedily add the input channel whose k×k block explains
    most of the group's remaining output variance (block forward selection on the moments).

    Keeps the residual covariance of all columns after projecting out the chosen ones, so each
    step is one rank-k² update; ``m`` must cover all input channels in order. With
    ``greedy=False`` (very wide layers, where the updates would cost minutes) the channels are
    ranked once by their individual gain instead. ``nested=True`` returns the channels in the
    order they were chosen (every prefix is the choice for that many channels), else sorted.
    ``chunk > 1`` adds that many channels per step (the best by current gain): coarser, but
    ``chunk`` times fewer updates — the sensitivity curves order every channel of every layer.
    """
    mu = m.sx / m.n
    cov = m.xx / m.n - np.outer(mu, mu)
    cross = m.xy[:, rows] / m.n - np.outer(mu, m.sy[rows] / m.n)
    d = cov.shape[0]
    c = d // k2
    lam_scalar = ridge * max(np.trace(cov) / d, 1e-12)
    lam = lam_scalar * np.eye(k2)
    available = np.ones(c, dtype=bool)
    chosen: list[int] = []
    while len(chosen) < n_keep:
        diag = cov.reshape(c, k2, c, k2)[np.arange(c), :, np.arange(c), :]  # [c, k2, k2]
        blocks = cross.reshape(c, k2, -1)
        gain = np.einsum("ckr,ckr->c", blocks, np.linalg.solve(diag + lam, blocks))
        gain[~available] = -np.inf
        if not greedy:
            ranked = [int(i) for i in np.argsort(-gain, kind="stable")[:n_keep]]
            return ranked if nested else sorted(ranked)
        take = min(chunk, n_keep - len(chosen))
        if take == 1:
            best = int(np.argmax(gain))
            chosen.append(best)
            available[best] = False
            cols = slice(best * k2, (best + 1) * k2)
            inv = np.linalg.inv(cov[cols, cols] + lam)
        else:
            picked = [int(i) for i in np.argsort(-gain, kind="stable")[:take]]
            chosen.extend(picked)
            available[picked] = False
            cols = np.concatenate([np.arange(i * k2, (i + 1) * k2) for i in picked])
            inv = np.linalg.inv(cov[np.ix_(cols, cols)] + lam_scalar * np.eye(len(cols)))
        side = cov[:, cols] @ inv
        cross = cross - side @ cross[cols]
        cov = cov - side @ cov[cols]
    return chosen if nested else sorted(chosen)
