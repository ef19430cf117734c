"""CI gates: budgets the pruned model must meet, or the step fails with its own exit code.

Why: in a CI "model-compression step" a result that is worse than allowed (too much accuracy
lost, slower than the input) is neither a bad command line (exit 2) nor an onnxprune bug
(exit 1); the pipeline must say so with a code of its own (``BUDGET_NOT_MET``), write no model
where the next step would pick it up, and still leave the report and summary that say why.

Gates (each evaluated after the pass; all of them are evaluated, so a failing run reports every
budget it missed, not only the first):

- ``min_agreement`` (an explicit ``--min-agreement P``): the final model's top-1 agreement with
  the input model on the held-out calibration inputs (``report["calibration"]["fidelity"]``, or
  the distillation's held-out measurement when its weights were kept) is at least P. The
  fidelity budget search (``budget.py``) already plans for it. A model whose first output holds
  no class scores (a detector map, a sequence without a Softmax) has no agreement to measure:
  ``check_measurable`` refuses the option before any work, from the first calibration batch;
  should one slip through anyway, the gate fails.
- ``max_accuracy_drop`` (``--eval-data X.npz --max-accuracy-drop PTS``): top-1 accuracy on
  labelled data (read and scored by ``evaluate.py``, as ``onnxprune eval`` does) drops by at most
  PTS percentage points from the input model's.
- ``check_speed`` (``--check-speed``): the interleaved timing of ``bench.check_speed``; the pruned
  model may not be slower than the input (beyond its noise margin).

The measurements go into the JSON report (``accuracy``, ``speed``, ``gates``); ``prune()``
raises ``BudgetNotMet`` carrying the model and report when a gate fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError

BUDGET_NOT_MET = 3  # exit code of a run whose output misses a budget (2: bad input, 1: internal failure)


class BudgetNotMet(RuntimeError):
    """The pruned model misses a budget. ``model`` and ``report`` are what the run produced (the
    CLI writes them only where asked: ``--keep-failed``, ``--report``, ``--summary-md``).

    A RuntimeError, so Python callers that caught ``--check-speed``'s failure before still do."""

    def __init__(self, model, report, failed: list[dict]):
        self.model, self.report, self.failed = model, report, failed
        super().__init__("budget not met: " + "; ".join(gate["detail"] for gate in failed))


def failed_path(output: str) -> str:
    """Where ``--keep-failed`` writes a model that missed a budget: ``OUT.onnx`` -> ``OUT.failed.onnx``."""
    text = str(output)
    stem = text[: -len(".onnx")] if text.lower().endswith(".onnx") else text
    return stem + ".failed.onnx"


def check_options(config) -> None:
    """Gate options that cannot work, before any work (one-line ``UserError``)."""
    drop = getattr(config, "max_accuracy_drop", None)
    if drop is not None:
        if getattr(config, "eval_data", None) is None:
            raise UserError("--max-accuracy-drop needs --eval-data X.npz (labelled images: 'images' and 'labels')")
        if not (isinstance(drop, (int, float)) and math.isfinite(drop) and 0 <= drop <= 100):
            raise UserError(f"--max-accuracy-drop is in percentage points, 0 to 100, got {drop}")


def check_measurable(config, model, first_output: np.ndarray) -> None:
    """Refuse an explicit ``--min-agreement`` on a model whose first output has no class axis
    (``class_scores``' rules, on ``first_output``, that output on the first calibration batch):
    the gate could only fail, after minutes of planning, so it is a bad command line (exit 2)."""
    from .class_scores import class_axis, output_kind

    budget = explicit_min_agreement(config)
    if budget is None:
        return
    name = model.graph.output[0].name
    if class_axis(output_kind(model, name), np.shape(first_output)) is None:
        shape = "x".join(str(d) for d in np.shape(first_output))
        raise UserError(f"--min-agreement {budget:g} cannot be measured: the first output {name!r} ({shape} on the "
                        f"calibration inputs) holds no class scores (no Softmax and no single class axis); drop "
                        f"--min-agreement (calibration still reports the output's relative squared error)")


def explicit_min_agreement(config) -> float | None:
    """The ``--min-agreement`` gate: only an explicit number (the 0.97 default with ``--calib`` is a
    planning aim, not a budget the user asked to enforce)."""
    value = getattr(config, "min_agreement", None)
    return None if value is None or isinstance(value, str) else float(value)


@dataclass
class AccuracyCheck:
    """Labelled evaluation data with the input model's logits, prepared before any work: a file
    that cannot be read, or a model that cannot run on it, fails now rather than after planning."""

    data: object  # evaluate.Dataset
    reference_logits: np.ndarray
    reference: dict  # evaluate() of the input model

    @classmethod
    def prepare(cls, original, source) -> "AccuracyCheck":
        from .evaluate import Dataset, evaluate, load_npz, predict_logits

        data = source if isinstance(source, Dataset) else load_npz(source)
        label = str(source) if isinstance(source, (str, Path)) else "the evaluation data"
        try:
            logits = predict_logits(original, data.images)
            reference = evaluate(logits, data)
        except UserError as exc:
            raise UserError(f"--eval-data {label}: {exc}") from None
        return cls(data, logits, reference)

    def measure(self, pruned) -> dict:
        from .evaluate import evaluate

        after = evaluate(pruned, self.data, reference=self.reference_logits)
        before_top1, after_top1 = self.reference["top1"], after["top1"]
        return {"data": self.data.description, "images": after["num_images"],
                "top1_before": before_top1, "top1_after": after_top1,
                "drop_points": round(100 * (before_top1 - after_top1), 4),
                "agreement": after["reference"]["agreement"]}


def final_agreement(report: dict) -> tuple[float | None, int | None, str]:
    """(top-1 agreement, samples, on what) of the model the run returns, with the input model."""
    distilled = report.get("distill") or {}
    if distilled.get("kept") and (distilled.get("holdout") or {}).get("after", {}).get("top1_agreement") is not None:
        after = distilled["holdout"]["after"]
        return after["top1_agreement"], after.get("count"), "held-out calibration inputs, after distillation"
    fid = (report.get("calibration") or {}).get("fidelity") or {}
    return (fid.get("calibrated") or {}).get("top1_agreement"), fid.get("samples"), fid.get("on", "")


def evaluate_gates(report: dict, config) -> list[dict]:
    """Every gate ``config`` asks for, judged on ``report``: ``{"gate", "threshold", "measured",
    "passed", "detail"}`` each (``measured`` None when it could not be measured)."""
    gates = []
    budget = explicit_min_agreement(config)
    if budget is not None:
        agreement, samples, on = final_agreement(report)
        if agreement is None:
            detail = ("top-1 agreement cannot be measured (the model's first output is not class scores); "
                      f"--min-agreement {budget:g} cannot be checked")
        else:
            detail = (f"top-1 agreement {agreement:.1%} on {samples} {on} "
                      f"{'>=' if agreement >= budget else '<'} --min-agreement {budget:.1%}")
        gates.append({"gate": "min_agreement", "threshold": budget, "measured": agreement,
                      "passed": agreement is not None and agreement >= budget, "detail": detail})
    drop = getattr(config, "max_accuracy_drop", None)
    if drop is not None:
        accuracy = report.get("accuracy") or {}
        measured = accuracy.get("drop_points")
        detail = (f"top-1 accuracy {accuracy['top1_before']:.2%} -> {accuracy['top1_after']:.2%} on "
                  f"{accuracy['images']} labelled images: drop {measured:.2f} points "
                  f"{'<=' if measured <= drop else '>'} --max-accuracy-drop {drop:g}")
        gates.append({"gate": "max_accuracy_drop", "threshold": drop, "measured": measured,
                      "passed": measured <= drop + 1e-9, "detail": detail})
    if getattr(config, "check_speed", False):
        speed = report.get("speed") or {}
        ratio, limit = speed.get("ratio"), 1.0 + speed.get("margin", 0.0)
        detail = (f"per-round latency ratio {ratio:.3f} (medians {speed['pruned_median_ms']:.3f} ms vs "
                  f"{speed['original_median_ms']:.3f} ms on {speed['settings']['provider']}) "
                  f"{'<=' if speed['passed'] else '>'} {limit:.2f}: "
                  + ("not slower than the input" if speed["passed"] else "slower than the input"))
        gates.append({"gate": "check_speed", "threshold": round(limit, 4), "measured": ratio,
                      "passed": bool(speed["passed"]), "detail": detail})
    return gates
