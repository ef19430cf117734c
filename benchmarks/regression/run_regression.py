#!/usr/bin/env python
"""Prune every cached regression model with the onnxprune CLI, in the default and --groups 8 modes.

Why the CLI and not the Python API: the suite checks what a user gets, exit codes and one-line
errors included. Each run is ``python -m onnxprune.cli IN OUT [--input-shape ...] -q --report R``
with verification on (see regression_models.cli_command); then the pruned model must run at the
manifest's ``other_shape`` (another size and batch) with the original's output shapes (see
regression_models.check_other_shape). Prints a markdown table: model, source
package, exporter, task, then per mode the result (ok, or the exit code and the error line),
Convs pruned/skipped, MACs ratio (after/before, at the working input shape) and wall time.

    python benchmarks/regression/run_regression.py [--only ID ...] [--modes default groups8]
                                                   [--out table.md] [--json results.json]

Models not in the cache are listed as "not fetched" (run fetch_models.py first). Deterministic:
onnxprune's default seed, the same input shapes every time; only wall times vary.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from regression_models import (  # noqa: E402
    MODES, cache_dir, check_other_shape, cli_command, is_cached, load_manifest, model_file)

REPO = HERE.parent.parent


def error_line(stderr: str) -> str:
    """The line that says what went wrong: a traceback's last line, else stderr's first line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if not lines:
        return ""
    if any(line.startswith("Traceback") for line in lines):
        return "traceback: " + lines[-1]
    return lines[0]


def run_one(entry: dict, manifest: dict, mode: str, work: Path, timeout: float) -> dict:
    """Prune one model in one mode; the result row (never raises for a failing prune)."""
    out, report = work / f"{entry['id']}_{mode}.onnx", work / f"{entry['id']}_{mode}.json"
    cmd = cli_command(model_file(entry, manifest), out, report, entry, mode)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        rc, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired:
        rc, stderr = "timeout", f"no result after {timeout:.0f} s"
    row = {"mode": mode, "rc": rc, "wall_s": time.perf_counter() - start, "error": "", "verified": False}
    if rc != 0:
        row["error"] = error_line(stderr)
        return row
    data = json.loads(report.read_text())
    verify = data.get("verify") or {}
    row.update(verified=bool(verify.get("passed")), max_rel_diff=verify.get("max_rel_diff"),
               pruned=data["convs_pruned"], skipped=data["convs_skipped"],
               macs_ratio=data["macs_after"] / data["macs_before"] if data["macs_before"] else None)
    if not row["verified"]:
        row["error"] = "exit 0 but not verified"
    elif entry.get("other_shape"):
        problem = check_other_shape(model_file(entry, manifest), out, entry["other_shape"], data["convs_pruned"] == 0)
        row["other_shape"] = problem or "ok"
        if problem and not problem.startswith("n/a"):
            row["error"] = problem
    for path in (out, report):  # the outputs are large; the table keeps what matters
        path.unlink(missing_ok=True)
    return row


def cell(row: dict | None) -> str:
    """One mode's markdown cells: result | pruned/skipped | MACs ratio | time."""
    if row is None:
        return "not fetched | | | "
    if row["rc"] != 0 or row["error"]:
        text = row["error"].replace("|", "\\|")[:160]
        return f"**exit {row['rc']}**: {text} | | | {row['wall_s']:.1f} s"
    ratio = "n/a" if row["macs_ratio"] is None else f"{row['macs_ratio']:.3f}"
    note = " (other shape n/a)" if row.get("other_shape", "").startswith("n/a") else ""
    return f"ok{note} | {row['pruned']}/{row['skipped']} | {ratio} | {row['wall_s']:.1f} s"


def table(manifest: dict, results: dict, modes: list[str]) -> str:
    """The markdown table, one line per manifest model, in manifest order."""
    head = "| model | package | exporter | task | " + " | ".join(
        f"{m}: result | {m}: pruned/skipped | {m}: MACs ratio | {m}: time" for m in modes) + " |"
    lines = [head, "|" + "---|" * (4 + 4 * len(modes))]
    for entry in manifest["models"]:
        pin = manifest["packages"][entry["package"]]
        rows = results.get(entry["id"], {})
        source = f"{entry['package']}=={pin['version']}"
        lines.append(f"| {entry['id']} | {source} | {entry['exporter']} | {entry['task']} | "
                     + " | ".join(cell(rows.get(m)) for m in modes) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="ID")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per prune (default 1200)")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--json", type=Path, help="also write every result row as JSON here")
    args = parser.parse_args(argv)
    manifest = load_manifest()
    entries = [e for e in manifest["models"] if not args.only or e["id"] in args.only]
    results: dict[str, dict] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnxprune_regression_") as tmp:
        for entry in entries:
            if not is_cached(entry, manifest):
                print(f"  {entry['id']}: not in the cache {cache_dir()}", file=sys.stderr)
                continue
            for mode in args.modes:
                row = run_one(entry, manifest, mode, Path(tmp), args.timeout)
                results.setdefault(entry["id"], {})[mode] = row
                status = "ok" if row["rc"] == 0 and not row["error"] else f"FAIL ({row['rc']}) {row['error']}"
                print(f"  {entry['id']} [{mode}] {status} {row['wall_s']:.1f} s", file=sys.stderr, flush=True)
    total = time.perf_counter() - start
    shown = {"models": [e for e in manifest["models"] if e in entries], "packages": manifest["packages"]}
    text = table(shown, results, args.modes)
    runs = [r for rows in results.values() for r in rows.values()]
    ok = sum(1 for r in runs if r["rc"] == 0 and not r["error"])
    summary = (f"{ok}/{len(runs)} runs ok (exit 0, verified, runs at other_shape); total wall time {total:.0f} s "
               f"on {platform.machine()} {platform.python_version()}")
    print(text + "\n\n" + summary)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n\n" + summary + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"summary": summary, "results": results}, indent=1) + "\n")
    return 0 if ok == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
