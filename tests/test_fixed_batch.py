"""Models with a fixed batch dimension and more calibration samples than the batch: every stage
that runs calibration data (sensitivity, calibration, fidelity) feeds whole batches of the
model's size. Before the fix the fidelity planner's sensitivity pass fed 64 samples at once to
a [1, 3, H, W] model: an ONNX Runtime InvalidArgument traceback."""

import json

import numpy as np
import onnx
import pytest

from graphs import resnet_basic
from onnxprune.cli import main


@pytest.mark.parametrize("batch,samples", [(1, 8), (4, 46)])
@pytest.mark.parametrize("mode", [[], ["--groups", "8"]], ids=["default", "groups8"])
def test_fixed_batch_with_more_calibration_samples(tmp_path, capsys, batch, samples, mode):
    model, calib = tmp_path / "in.onnx", tmp_path / "calib.npz"
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(resnet_basic(batch=batch).model(), model)
    rng = np.random.default_rng(0)
    np.savez(calib, input=rng.standard_normal((samples, 3, 16, 16)).astype(np.float32))
    code = main([str(model), str(out), "--calib", str(calib), "--report", str(report), "-q", *mode])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Traceback" not in err
    data = json.loads(report.read_text())
    assert data["verify"]["passed"]
    assert data["calibration"]["samples"] == samples // batch * batch
    dim = onnx.load(out).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_value == batch  # the output keeps the fixed batch


def test_distill_on_a_fixed_batch_model_is_skipped_with_the_reason(tmp_path, capsys):
    """Distillation runs batches of 32: on a [1, 3, H, W] model it is skipped, saying why, and the
    verified refit model is written (before: an ONNX Runtime InvalidArgument traceback)."""
    pytest.importorskip("torch")
    model, calib = tmp_path / "in.onnx", tmp_path / "calib.npz"
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(resnet_basic(batch=1).model(), model)
    np.savez(calib, input=np.random.default_rng(0).standard_normal((32, 3, 16, 16)).astype(np.float32))
    code = main([str(model), str(out), "--calib", str(calib), "--groups", "8", "--distill", "--distill-steps", "1",
                 "--report", str(report), "-q"])
    err = capsys.readouterr().err
    assert code == 0, err
    data = json.loads(report.read_text())
    assert "batch size is fixed at 1" in data["distill"]["skipped"]
    assert data["verify"]["passed"] and out.exists()


def test_calibrate_leaves_the_callers_data_whole():
    """The pipeline hands one set of calibration arrays to every calibration: cutting them to
    whole batches must happen on a copy, so each call reports the cut."""
    from types import SimpleNamespace

    from onnxprune.calibration.calibrate import calibrate
    from onnxprune.ir.normalize import normalize
    from onnxprune.planning.plan import Plan

    model = normalize(resnet_basic(batch=4).model())
    feeds = {"input": np.random.default_rng(0).standard_normal((46, 3, 16, 16)).astype(np.float32)}
    for _ in range(2):
        report = calibrate(model, Plan([]), SimpleNamespace(calib=feeds, calib_size=None), feeds=feeds).report
        assert report["conversions"] == ["fixed batch size 4: used 44 of 46 samples"]
    assert len(feeds["input"]) == 46
