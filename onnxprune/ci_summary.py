"""``--summary-md FILE``: one run on one screen, as markdown for a CI log or a GitHub job summary.

Why: whoever looks at a failed (or passed) compression step reads the job summary, not the JSON
report. They need, in a dozen lines: how much smaller the model got, whether the output was
verified, what was measured against the input model (agreement, accuracy, latency) and which
budget passed or failed. Everything here is read from the JSON report, so the two never disagree.
"""

from __future__ import annotations


def markdown(report: dict, source: str, output: str, written: str | None) -> str:
    """The summary of ``report`` for a run from ``source`` to ``output``; ``written`` is where the
    model went (``output``, the ``--keep-failed`` name, or None when nothing was written)."""
    gates = report.get("gates") or []
    failed = [gate for gate in gates if not gate["passed"]]
    if not failed:
        status = "**PASS**"
    else:
        where = f"kept as {_code(written)}" if written else f"nothing written at {_code(output)}"
        status = f"**FAIL: budget not met** (exit 3; {where})"
    lines = [f"### onnxprune {_code(source)} → {_code(output)}: {status}", "",
             "| | input | output | change |", "|---|---:|---:|---:|",
             _row("MACs", report["macs_before"], report["macs_after"]),
             _row("params", report["params_before"], report["params_after"]),
             f"| pruned Convs | | {report['convs_pruned']} | {report['convs_skipped']} left dense |",
             f"| verified against the masked input | | {_verify(report.get('verify'))} | |"]
    lines += _measured(report)
    lines += ["", "| gate | budget | measured | result |", "|---|---|---|---|"]
    lines += [_gate_row(gate) for gate in gates] or ["| (none set) | | | |"]
    if failed:
        lines += ["", *(f"- {_escape(gate['detail'])}" for gate in failed)]
    return "\n".join(lines) + "\n"


def _measured(report: dict) -> list[str]:
    from .checks.gate import final_agreement

    rows = []
    agreement, samples, on = final_agreement(report)
    if agreement is not None:
        rows.append(f"| top-1 agreement with the input ({samples} {_escape(on)}) | 100% | {agreement:.1%} | |")
    accuracy = report.get("accuracy")
    if accuracy:
        rows.append(f"| top-1 accuracy ({_escape(accuracy['data'])}) | {accuracy['top1_before']:.2%} | "
                    f"{accuracy['top1_after']:.2%} | {-accuracy['drop_points']:+.2f} pts |")
    precision = report.get("precision")
    if precision:
        if precision.get("verified"):
            check = (f"max rel. diff {precision['max_rel_diff']:.2e} vs {_escape(precision['reference'])} "
                     f"(tolerance {precision['tolerance']:g})")
        else:
            check = "not checked (--no-verify)"
        agreement = precision.get("agreement")
        rows.append(f"| fp16 output | fp32 | {check} | "
                    f"{'' if agreement is None else f'{agreement:.1%} top-1 agreement with fp32'} |")
    speed = report.get("speed")
    if speed:
        rows.append(f"| latency: medians, per-round ratio ({_escape(speed['settings']['provider'])}, "
                    f"batch {speed['batch']}) | {speed['original_median_ms']:.3f} ms | "
                    f"{speed['pruned_median_ms']:.3f} ms | ×{speed['ratio']:.3f} |")
    return rows


def _gate_row(gate: dict) -> str:
    name, threshold, measured = gate["gate"], gate["threshold"], gate["measured"]
    if name == "min_agreement":
        budget, value = f"≥ {threshold:.1%}", None if measured is None else f"{measured:.1%}"
    elif name == "max_accuracy_drop":
        budget, value = f"drop ≤ {threshold:g} pts", f"{measured:.2f} pts"
    else:
        budget, value = f"latency ratio ≤ {threshold:.2f}", f"{measured:.3f}"
    result = "PASS" if gate["passed"] else "**FAIL**"
    return f"| --{name.replace('_', '-')} | {budget} | {value or 'not measurable'} | {result} |"


def _verify(verify: dict | None) -> str:
    if not verify:
        return "skipped (--no-verify)"
    state = "passed" if verify.get("passed") else "**FAILED**"
    return f"{state} (max rel. diff {verify['max_rel_diff']:.1e}, tolerance {verify['tolerance']:g})"


def _row(label: str, before: int, after: int) -> str:
    change = f"{100 * (after / before - 1):+.1f}%" if before else "n/a"
    return f"| {label} | {_count(before)} | {_count(after)} | {change} |"


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _code(path) -> str:
    return f"`{_escape(str(path)).replace('`', '')}`"


def _escape(text: str) -> str:
    """Table-safe: a ``|`` would end the cell, a newline the row."""
    return str(text).replace("|", "\\|").replace("\n", " ")
