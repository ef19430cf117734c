"""How distillation measures the student against the teacher: the training loss and the reported agreement.

Why separate from ``distill.py``: these are the numbers the report is judged by (and the loss
the loop minimizes); keeping them apart from the loop's bookkeeping keeps their definitions in
one short place. Rules:
- training loss (torch, differentiable): KL(teacher || student) on softmax(logits / T) x T²
  (``"kl"``), or the mean squared logit error (``"mse"``); class axis 1;
- logits for measuring come from ONNX Runtime in batches of ``EVAL_BATCH``, first graph output;
- agreement (numpy, float64): mean KL(teacher || student) of the softmax at temperature 1 (over
  any positions after the class axis, then samples), rounded to 6 digits, and top-1 agreement
  rounded to 4; with no samples both are None (its ``temperature`` argument is not used: the
  reported KL is at T=1 whatever the training temperature);
- ``rel_diff``: max |difference| / max |reference| (inf for mismatched shapes), the bridge and
  export checks' measure; ``loss_curve``: first/last 10% means, min and up to 20 chunk means.
"""

from __future__ import annotations

import numpy as np

EVAL_BATCH = 32


def distill_loss(output, target, kind, temperature):
    import torch

    if kind == "mse":
        return torch.mean((output - target) ** 2)
    s = torch.log_softmax(output / temperature, dim=1)
    t = torch.log_softmax(target / temperature, dim=1)
    kl = torch.sum(t.exp() * (t - s), dim=1)
    return kl.mean() * temperature ** 2


def logits(sess, feeds: dict) -> np.ndarray:
    name = sess.get_outputs()[0].name
    count = len(next(iter(feeds.values())))
    parts = [sess.run([name], {k: v[i:i + EVAL_BATCH] for k, v in feeds.items()})[0]
             for i in range(0, count, EVAL_BATCH)]
    return np.concatenate(parts) if parts else np.zeros((0,), np.float32)


def agreement(teacher: np.ndarray, student: np.ndarray, temperature: float) -> dict:
    if len(teacher) == 0:
        return {"kl": None, "top1_agreement": None, "count": 0}
    t = _log_softmax(teacher.astype(np.float64))
    s = _log_softmax(student.astype(np.float64))
    kl = np.sum(np.exp(t) * (t - s), axis=1)
    kl = kl.reshape(len(kl), -1).mean(axis=1)
    agree = np.argmax(teacher, axis=1) == np.argmax(student, axis=1)
    return {"kl": round(float(kl.mean()), 6), "top1_agreement": round(float(agree.mean()), 4),
            "count": int(len(teacher))}


def _log_softmax(x, axis=1):
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def rel_diff(reference, candidate) -> float:
    reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    if reference.shape != candidate.shape:
        return float("inf")
    return float(np.max(np.abs(reference - candidate)) / max(float(np.max(np.abs(reference))), 1e-12))


def loss_curve(losses: list[float], points: int = 20) -> dict:
    if not losses:
        return {"first": None, "last": None, "min": None, "points": []}
    k = max(1, len(losses) // 10)
    chunks = np.array_split(np.asarray(losses), min(points, len(losses)))
    return {"first": round(float(np.mean(losses[:k])), 6), "last": round(float(np.mean(losses[-k:])), 6),
            "min": round(float(np.min(losses)), 6), "points": [round(float(c.mean()), 6) for c in chunks]}
