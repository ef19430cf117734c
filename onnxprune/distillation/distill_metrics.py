"""How distillation measures the student against the teacher: the training loss and the reported agreement.

Why separate from ``distill.py``: these are the numbers the report is judged by (and the loss
the loop minimizes); keeping them apart from the loop's bookkeeping keeps their definitions in
one short place. Rules:
- the class axis and whether the output is probabilities come from ``checks/class_scores.py``
  (the one reading every fidelity number shares): a recogniser's ``N × T × C`` is compared over
  C at every time step, a Softmax's probabilities through their log;
- training loss (torch, differentiable): KL(teacher || student) on softmax(logits / T) x T²
  (``"kl"``), or the mean squared error of the output (``"mse"``). An output without class
  scores (a detector's map) has no softmax to compare: ``"kl"`` falls back to the squared error
  relative to the teacher's mean square (``"rel_mse"``; a KL over a singleton axis is 0 and
  would train nothing);
- logits for measuring come from ONNX Runtime in batches of ``EVAL_BATCH``, first graph output;
- agreement (numpy, float64): mean KL(teacher || student) of the softmax at temperature 1 (over
  any positions after the class axis, then samples; ``evaluate.compare_logits``, the definition
  calibration's fidelity uses too), rounded to 6 digits, top-1 agreement
  rounded to 4, and the relative squared error (``rel_mse``, 6 digits); KL and agreement are None
  for an output without class scores, all three with no samples (its ``temperature`` argument is
  not used: the reported KL is at T=1 whatever the training temperature);
- ``rel_diff``: max |difference| / max |reference| (inf for mismatched shapes), the bridge and
  export checks' measure; ``loss_curve``: first/last 10% means, min and up to 20 chunk means.
"""

from __future__ import annotations

import numpy as np

from ..checks.class_scores import PROBABILITY_FLOOR, OutputKind, as_logits, class_axis
from ..checks.evaluate import compare_logits

EVAL_BATCH = 32


def loss_used(kind: str, classes: OutputKind, shape: tuple) -> str:
    """The loss ``distill_loss`` computes for ``kind`` on an output of ``shape``."""
    return "rel_mse" if kind == "kl" and class_axis(classes, shape) is None else kind


def distill_loss(output, target, kind, temperature, classes: OutputKind = OutputKind()):
    import torch

    used = loss_used(kind, classes, tuple(output.shape))
    if used == "mse":
        return torch.mean((output - target) ** 2)
    if used == "rel_mse":
        return torch.mean((output - target) ** 2) / torch.mean(target ** 2).clamp_min(1e-12)
    axis = class_axis(classes, tuple(output.shape))
    if classes.probabilities:
        output, target = (torch.log(x.clamp_min(PROBABILITY_FLOOR)) for x in (output, target))
    s = torch.log_softmax(torch.movedim(output, axis, 1) / temperature, dim=1)
    t = torch.log_softmax(torch.movedim(target, axis, 1) / temperature, dim=1)
    kl = torch.sum(t.exp() * (t - s), dim=1)
    return kl.mean() * temperature ** 2


def logits(sess, feeds: dict) -> np.ndarray:
    name = sess.get_outputs()[0].name
    count = len(next(iter(feeds.values())))
    parts = [sess.run([name], {k: v[i:i + EVAL_BATCH] for k, v in feeds.items()})[0]
             for i in range(0, count, EVAL_BATCH)]
    return np.concatenate(parts) if parts else np.zeros((0,), np.float32)


def agreement(teacher: np.ndarray, student: np.ndarray, temperature: float,
              classes: OutputKind = OutputKind()) -> dict:
    if len(teacher) == 0:
        return {"kl": None, "top1_agreement": None, "rel_mse": None, "count": 0}
    t64, s64 = teacher.astype(np.float64), student.astype(np.float64)
    rel = round(float(np.sum((s64 - t64) ** 2) / max(float(np.sum(t64 ** 2)), 1e-30)), 6)
    if class_axis(classes, teacher.shape) is None:
        return {"kl": None, "top1_agreement": None, "rel_mse": rel, "count": int(len(teacher))}
    stats = compare_logits(as_logits(s64, classes), as_logits(t64, classes))  # the one KL and agreement
    return {"kl": round(stats["mean_kl"], 6), "top1_agreement": round(stats["agreement"], 4),
            "rel_mse": rel, "count": int(len(teacher))}


def lower_is_better(measured: dict) -> float | None:
    """The number a held-out comparison goes by: the KL, or the relative squared error of an
    output without class scores."""
    return measured["kl"] if measured["kl"] is not None else measured["rel_mse"]


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
