#!/usr/bin/env python
"""``--coupled-rate 0.5`` on every model of the real-model regression suite: how many coupled
channel groups were narrowed, whether the output verified, and what left the other groups alone
(the report's ``coupled.left_alone`` reasons, names elided, counted). Issue 10 asks "what froze on
which real models"; this answers it for the 21 cached models.

    python benchmarks/regression/fetch_models.py && python benchmarks/regression/coupled_survey.py
"""

from __future__ import annotations

import collections
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import regression_models as R  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def survey(rate: float = 0.5) -> list[tuple[str, str]]:
    manifest = R.load_manifest()
    rows = []
    for entry in manifest["models"]:
        path = R.model_file(entry, manifest)
        if not path.exists():
            rows.append((entry["id"], "not cached (run fetch_models.py)"))
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out, report = Path(tmp) / "out.onnx", Path(tmp) / "report.json"
            cmd = R.cli_command(path, out, report, entry, "default") + ["--coupled-rate", str(rate)]
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
            if run.returncode:
                last = (run.stderr.strip().splitlines() or [""])[-1]
                rows.append((entry["id"], f"exit {run.returncode}: {last[:150]}"))
                continue
            data = json.loads(report.read_text())
        reasons = collections.Counter()
        for left in data["coupled"]["left_alone"]:
            reason = re.sub(r"\(.*\)", "", re.sub(r"'[^']*'", "X", left["reason"])).strip()
            reasons[reason[:80]] += 1
        macs = data["macs_after"] / data["macs_before"] if data["macs_before"] else float("nan")
        rows.append((entry["id"], f"{len(data['coupled']['groups'])} | x{macs:.3f} | "
                                  f"{data['verify']['max_rel_diff']:.1e} | "
                                  + "; ".join(f"{k} ×{v}" for k, v in reasons.most_common(4))))
    return rows


def main() -> None:
    print("| model | groups narrowed | MACs | verify max rel. diff | groups left alone (top reasons) |")
    print("|---|---|---|---|---|")
    for model, text in survey():
        print(f"| {model} | {text} |", flush=True)


if __name__ == "__main__":
    main()
