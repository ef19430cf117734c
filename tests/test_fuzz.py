"""Property-based fuzzing (issue 12, item 6): random small CNN graphs (``fuzz_models.py``) pruned
by the CLI in the default mode and with ``--groups 8`` either exit 0 with a verified output
(the rewrite equals the masked original: the pipeline's own verification, plus the output's
interface checked here) or exit 2 with one line saying why; never a traceback, never exit 1.

Deterministic (``derandomize``: the same examples on every run) and bounded to about a minute on
two cores; run with ``FUZZ_EXAMPLES=300`` for a longer hunt.
"""

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_models import build, recipes
from onnxprune.cli import main

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
MODES = {"default": [], "groups8": ["--groups", "8"]}


def _interface(model):
    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
    return ([(i.name, dims(i)) for i in model.graph.input], [o.name for o in model.graph.output])


def _prune(model, argv):
    """``onnxprune IN OUT --report R *argv`` in a fresh folder -> (exit code, stderr, report, output)."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        src, out, report = folder / "in.onnx", folder / "out.onnx", folder / "r.json"
        onnx.save(model, src)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main([str(src), str(out), "--report", str(report), "-q",
                         *(a.replace("{dir}", str(folder)) for a in argv)])
        data = json.loads(report.read_text()) if report.exists() else None
        pruned = onnx.load(out) if out.exists() else None
        leftovers = [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    return code, err.getvalue(), data, pruned, leftovers


def _calib_file(recipe):
    h, w = recipe["size"]
    rng = np.random.default_rng(recipe["seed"])
    return {"input": np.abs(rng.standard_normal((24, recipe["channels"], h, w))).astype(np.float32)}


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(recipe=recipes(), min_channels=st.sampled_from(["4", "16"]), calib=st.booleans())
def test_random_cnns_prune_and_verify_or_refuse_cleanly(recipe, min_channels, calib):
    model = build(recipe)
    for mode, argv in MODES.items():
        argv = [*argv, "--min-channels", min_channels]
        with tempfile.TemporaryDirectory() as data_folder:
            if calib:
                path = Path(data_folder) / "calib.npz"
                np.savez(path, **_calib_file(recipe))
                argv += ["--calib", str(path)]
            code, err, report, pruned, leftovers = _prune(model, argv)
        lines = err.strip().splitlines()
        assert "Traceback" not in err, (mode, recipe, err)
        assert code in (0, 2), (mode, recipe, err)
        assert not leftovers
        if code == 2:  # refused: one line, nothing written
            assert len(lines) == 1 and lines[0].startswith("onnxprune: error: "), (mode, recipe, lines)
            assert pruned is None and report is None
            continue
        assert report["verify"]["passed"], (mode, recipe, report["verify"])
        onnx.checker.check_model(pruned, full_check=True)
        assert _interface(pruned) == _interface(model), (mode, recipe)
        assert report["macs_after"] <= report["macs_before"]
