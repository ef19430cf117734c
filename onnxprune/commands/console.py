"""What ``onnxprune IN.onnx OUT.onnx`` prints on stderr: progress, the summary, the warnings.

Why apart from ``prune.py``: the wording of every line a person or CI log reads is in one place,
and only from the report's JSON data (``pipeline.Report.data``), so it can be checked on a saved
report without running a pass.
"""

from __future__ import annotations

import sys
from collections import Counter

from ..pipeline import Progress


class ConsoleProgress(Progress):
    """Stage lines and a per-layer bar on stderr (a line per layer with -v or without a tty)."""

    def __init__(self, verbose: bool):
        self.verbose = verbose
        self.tty = sys.stderr.isatty()

    def stage(self, message: str) -> None:
        print(f"onnxprune: {message}", file=sys.stderr, flush=True)

    def layer(self, done: int, total: int, name: str) -> None:
        if self.tty and not self.verbose:
            width = 30
            filled = width * done // max(total, 1)
            end = "\n" if done == total else ""
            print(f"\r  [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {name[:40]:<40}",
                  end=end, file=sys.stderr, flush=True)
        elif done < total and (self.verbose or done % max(1, total // 10) == 0):
            print(f"  [{done + 1}/{total}] {name}", file=sys.stderr, flush=True)


def nothing_pruned_warning(report: dict) -> str | None:
    """Why no Conv was pruned (None if some were): the commonest skip rule, with a hint for a
    ``--groups`` that divides no layer's output channels. Reasons are counted by their rule, the
    text before the parenthesised numbers ("too few channels (C_in=3 < min-channels 16)"), and
    the first one is the example when they differ in their numbers."""
    if report["convs_pruned"]:
        return None
    options = report.get("options") or {}
    if options.get("rate") == 0 and options.get("target_macs") is None and options.get("target_speedup") is None \
            and not options.get("plan_in") and options.get("coupled_rate") in (None, "auto"):
        return None  # --rate 0 asks for nothing to be pruned (the reason each layer gives is the planner's)
    skipped = [layer for layer in report["layers"] if "skipped" in layer]
    if not skipped:
        return "no Conv was pruned: the model has no Conv"
    undivided = [layer for layer in skipped if "not divisible by groups" in layer["skipped"]]
    if undivided:
        return (f"no Conv was pruned: {len(undivided)} of {len(skipped)} Convs have C_out not divisible by "
                f"--groups (e.g. {undivided[0]['name']}: {undivided[0]['skipped']}); "
                "choose a --groups that divides their output channels")
    rule, count = Counter(_rule(layer["skipped"]) for layer in skipped).most_common(1)[0]
    reasons = [layer["skipped"] for layer in skipped if _rule(layer["skipped"]) == rule]
    because = reasons[0] if len(set(reasons)) == 1 else f"{rule} (e.g. {reasons[0][len(rule) + 2:]}"
    return f"no Conv was pruned: {count} of {len(skipped)} Convs skipped because {because}"


def _rule(reason: str) -> str:
    """A skip reason without its parenthesised numbers: the rule that left the Conv dense."""
    return reason.split(" (", 1)[0]


def summary(report: dict, output: str | None) -> str:
    mb, ma = report["macs_before"], report["macs_after"]
    pb, pa = report["pruned_layers_macs_before"], report["pruned_layers_macs_after"]
    lines = [f"onnxprune: pruned {report['convs_pruned']} Convs, left {report['convs_skipped']} dense",
             f"  MACs   {mb / 1e6:10.2f}M -> {ma / 1e6:10.2f}M  ({_cut(mb, ma)} whole model, "
             f"{_cut(pb, pa)} of the pruned layers)",
             f"  params {report['params_before'] / 1e6:10.3f}M -> {report['params_after'] / 1e6:10.3f}M  "
             f"({_cut(report['params_before'], report['params_after'])})"]
    calib = report.get("calibration")
    if calib and calib.get("fidelity"):
        fid = calib["fidelity"]
        before, after = fid["uncalibrated"], fid["calibrated"]
        if before.get("top1_agreement") is not None and after.get("top1_agreement") is not None:
            change = (f"top-1 agreement with the original on {fid['samples']} held-out inputs "
                      f"{100 * before['top1_agreement']:.1f}% -> {100 * after['top1_agreement']:.1f}%")
        else:  # the first output is not class scores (a detector's map): its relative squared error
            change = (f"relative squared error of the first output against the original's on {fid['samples']} "
                      f"held-out inputs {before['rel_mse']:.3g} -> {after['rel_mse']:.3g}")
        lines.append(f"  calibrated on {calib['fit_samples']} inputs: {change}")
    distilled = report.get("distill")
    if distilled and "skipped" in distilled:
        lines.append(f"  distillation skipped: {distilled['skipped']}")
    elif distilled and distilled.get("holdout"):
        before, after = distilled["holdout"]["before"], distilled["holdout"]["after"]
        if after.get("top1_agreement") is not None:
            change = f"top-1 agreement {100 * before['top1_agreement']:.1f}% -> {100 * after['top1_agreement']:.1f}%"
            measure = "KL"
        else:  # no class scores: the relative squared error it trained on
            change = f"relative squared error {before['rel_mse']:.3g} -> {after['rel_mse']:.3g}"
            measure = "error"
        lines.append(f"  distilled {distilled['steps_done']} steps ({distilled['train_s']:.0f} s): {change} on "
                     f"{distilled['images']['holdout']} held-out inputs"
                     + ("" if distilled.get("kept", True) else
                        f" (held-out {measure} did not drop: refit weights kept)"))
    search = report.get("budget")
    if search:
        lines.append(f"  fidelity budget {100 * search['min_agreement']:.0f}% top-1 agreement: "
                     f"{'met' if search['met'] else 'NOT met'} ({search['note']})")
    if report.get("sensitivity") and not str(report["sensitivity"]["source"]).startswith("calibration"):
        lines.append("  fidelity unmeasured: no --calib (cuts ranked by weight norms; expect a large accuracy loss "
                     "on real models without calibration data)")
    if report["verify"]:
        v = report["verify"]
        lines.append(f"  verify: max relative diff {v['max_rel_diff']:.2e} vs masked original "
                     f"(tolerance {v['tolerance']:g})" + (f"; {v['note']}" if v.get("note") else ""))
    fp16 = report.get("precision")
    if fp16:
        kept = ", ".join(fp16["kept_fp32_ops"]) or "none"
        if not fp16["verified"]:
            lines.append(f"  fp16: converted without checking (--no-verify); ops kept in fp32: {kept}")
        else:
            agreement = "" if fp16["agreement"] is None else \
                f", top-1 agreement {100 * fp16['agreement']:.2f}% on the calibration inputs"
            judged = f"; {fp16['judged']}" if fp16.get("judged") else ""
            lines.append(f"  fp16: max relative diff {fp16['max_rel_diff']:.2e} vs {fp16['reference']} "
                         f"(tolerance {fp16['tolerance']:g}){agreement}; ops kept in fp32: {kept}{judged}")
    accuracy = report.get("accuracy")
    if accuracy:
        lines.append(f"  top-1 accuracy on {accuracy['images']} labelled images "
                     f"{100 * accuracy['top1_before']:.2f}% -> {100 * accuracy['top1_after']:.2f}% "
                     f"({-accuracy['drop_points']:+.2f} points)")
    for gate in report.get("gates") or []:
        lines.append(f"  gate --{gate['gate'].replace('_', '-')}: {'PASS' if gate['passed'] else 'FAIL'} "
                     f"({gate['detail']})")
    lines.append(f"  wrote {output}" if output else "  no model written (a budget was not met)")
    return "\n".join(lines)


def _cut(before: int, after: int) -> str:
    return f"-{100 * (1 - after / before):.1f}%" if before else "n/a"

