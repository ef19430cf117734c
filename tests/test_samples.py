"""The committed Fashion-MNIST sample models and data under samples/ (made by make_samples.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxprune.commands.eval import load_dataset
from onnxprune.checks.evaluate import evaluate

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
ONNX_FILES = sorted(SAMPLES.glob("*.onnx"))
SNAP_RE = re.compile(r"^(?P<model>.+)_snap_e(?P<epoch>\d+\.\d+)\.onnx$")

# Measured top-1 on the committed 2k subset (sample_models.json): resnet20 92.40%, resnet56 91.85%;
# floors ~3 points lower.
ACCURACY_FLOORS = {"resnet20": 0.89, "resnet20_bn": 0.89, "resnet56": 0.88}
MIN_SNAPSHOTS = {"resnet20": 3, "resnet56": 3}


def _snapshots(model: str) -> list[Path]:
    return [p for p in ONNX_FILES if (m := SNAP_RE.match(p.name)) and m["model"] == model]


def _conv_weights(proto: onnx.ModelProto) -> dict[str, tuple]:
    inits = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    return {n.input[1]: inits[n.input[1]] for n in proto.graph.node if n.op_type == "Conv"}


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_expected_files_present():
    names = {p.name for p in ONNX_FILES}
    for f in ["resnet20.onnx", "resnet20_bn.onnx", "resnet56.onnx"]:
        assert f in names
    for model, k in MIN_SNAPSHOTS.items():
        assert len(_snapshots(model)) >= k, model
    for f in ["fmnist_calib.npz", "fmnist_eval.npz", "fmnist_labels.json", "sample_models.json"]:
        assert (SAMPLES / f).is_file(), f
    total = sum(p.stat().st_size for p in SAMPLES.iterdir() if p.is_file())
    assert total < 30 * 2**20, f"committed samples/ is {total / 2**20:.1f} MiB"


@pytest.mark.parametrize("path", ONNX_FILES, ids=lambda p: p.name)
def test_model_valid_and_runs_symbolic_batch(path):
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.ir_version <= 13
    assert {o.domain: o.version for o in proto.opset_import}.get("", None) == 17
    inp = proto.graph.input[0]
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value  # symbolic batch
    assert [d.dim_value for d in dims[1:]] == [1, 28, 28]
    # preprocessing lives in the graph: Pad, Sub, Div before the first Conv
    ops = [n.op_type for n in proto.graph.node]
    assert ops[:4] == ["Pad", "Sub", "Div", "Conv"]
    sess = _session(path)
    x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    (y,) = sess.run(None, {sess.get_inputs()[0].name: x})
    assert y.shape == (3, 10) and np.isfinite(y).all()


def test_bn_kept_only_in_bn_variant():
    bn = onnx.load(str(SAMPLES / "resnet20_bn.onnx"))
    folded = onnx.load(str(SAMPLES / "resnet20.onnx"))
    n_conv = sum(n.op_type == "Conv" for n in folded.graph.node)
    assert sum(n.op_type == "BatchNormalization" for n in bn.graph.node) == n_conv == 21
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    for p in ONNX_FILES:
        if p.name != "resnet20_bn.onnx":
            assert not any(n.op_type == "BatchNormalization" for n in onnx.load(str(p)).graph.node)


def test_bn_variant_matches_folded():
    x = load_dataset(None, prefer="subset").images[:64]
    outs = []
    for f in ("resnet20.onnx", "resnet20_bn.onnx"):
        s = _session(SAMPLES / f)
        outs.append(s.run(None, {s.get_inputs()[0].name: x})[0])
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-3)


@pytest.mark.parametrize("model", sorted(MIN_SNAPSHOTS))
def test_snapshot_conv_weights_match_final(model):
    final = _conv_weights(onnx.load(str(SAMPLES / f"{model}.onnx")))
    assert len(final) >= 21
    snaps = _snapshots(model)
    assert snaps
    for p in snaps:
        snap = _conv_weights(onnx.load(str(p)))
        assert snap == final, p.name  # identical names and shapes
        # ... but different values (a snapshot is not a copy of the final model)
    a = {i.name: i for i in onnx.load(str(snaps[0])).graph.initializer}
    b = {i.name: i for i in onnx.load(str(SAMPLES / f"{model}.onnx")).graph.initializer}
    name = next(iter(final))
    assert not np.array_equal(onnx.numpy_helper.to_array(a[name]),
                              onnx.numpy_helper.to_array(b[name]))


def test_snapshot_epochs_in_ticket_window():
    manifest = json.loads((SAMPLES / "sample_models.json").read_text())
    for model in MIN_SNAPSHOTS:
        entry = manifest[model]
        files = {s["file"] for s in entry["snapshots"]}
        assert files == {p.name for p in _snapshots(model)}
        for s in entry["snapshots"]:
            assert 0.11 <= s["fraction_of_training"] <= 0.24
            assert (SAMPLES / s["file"]).is_file()
            assert float(SNAP_RE.match(s["file"])["epoch"]) == pytest.approx(s["epoch"], abs=0.006)


def test_data_files():
    with np.load(SAMPLES / "fmnist_calib.npz") as z:
        assert z["images"].dtype == np.uint8 and z["images"].shape == (1024, 28, 28)
        assert z["labels"].shape == (1024,) and set(np.unique(z["labels"])) <= set(range(10))
    with np.load(SAMPLES / "fmnist_eval.npz") as z:
        assert z["images"].dtype == np.uint8 and z["images"].shape == (2000, 28, 28)
        assert np.bincount(z["labels"], minlength=10).tolist() == [200] * 10
    names = json.loads((SAMPLES / "fmnist_labels.json").read_text())
    assert len(names) == 10 and names[0] == "T-shirt/top" and names[9] == "Ankle boot"


@pytest.mark.parametrize("model", sorted(ACCURACY_FLOORS))
def test_accuracy_on_committed_subset(model):
    data = load_dataset(None, prefer="subset")
    r = evaluate(SAMPLES / f"{model}.onnx", data)
    assert r["num_images"] == 2000
    assert r["top1"] >= ACCURACY_FLOORS[model], r["top1"]
