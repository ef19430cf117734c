"""Calibration data loading: formats, conversions, and one-line errors with exit status 2."""

import numpy as np
import onnx
import pytest

from graphs import GraphBuilder, resnet_basic
from onnxprune.calibration.calib_data import load_calibration_inputs
from onnxprune.cli import main
from onnxprune.errors import UserError


def gray_model():
    b = GraphBuilder(channels=1, size=28)
    b.output(b.gemm(b.gap_flatten(b.relu(b.conv("input", 16))), 10))
    return b.model()


def test_uint8_images_npz_get_scaled_and_channel_axis(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (10, 28, 28), dtype=np.uint8)
    path = tmp_path / "c.npz"
    np.savez(path, images=images, labels=np.arange(10))
    notes = []
    feeds = load_calibration_inputs(str(path), gray_model(), 6, notes)
    x = feeds["input"]
    assert x.shape == (6, 1, 28, 28) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 0], images[:6] / 255.0, rtol=1e-6)
    assert len(notes) == 2


def test_npz_by_name_npy_and_folders(tmp_path):
    model = resnet_basic().model()
    x = np.random.default_rng(0).random((5, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "a.npz", input=x, other=np.zeros(3))
    np.save(tmp_path / "b.npy", x.astype(np.float64))
    (tmp_path / "per_input").mkdir()
    np.save(tmp_path / "per_input" / "input.npy", x)
    (tmp_path / "samples").mkdir()
    for i in range(5):
        np.save(tmp_path / "samples" / f"{i:03d}.npy", x[i])
    (tmp_path / "batches").mkdir()
    np.save(tmp_path / "batches" / "0.npy", x[:2])
    np.save(tmp_path / "batches" / "1.npy", x[2:])
    for source in ("a.npz", "b.npy", "per_input", "samples", "batches"):
        got = load_calibration_inputs(str(tmp_path / source), model, None)["input"]
        np.testing.assert_allclose(got, x, rtol=1e-6, err_msg=source)
    got = load_calibration_inputs({"input": x}, model, 2)["input"]
    assert got.shape == (2, 3, 16, 16)


def _files(tmp_path):
    x = np.zeros((4, 3, 16, 16), dtype=np.float32)
    np.save(tmp_path / "shape.npy", np.zeros((4, 3, 8, 8), dtype=np.float32))
    np.save(tmp_path / "dtype.npy", x.astype(np.int64))
    np.savez(tmp_path / "name.npz", a=x, b=x)
    np.save(tmp_path / "nosamples.npy", np.zeros((0, 3, 16, 16), dtype=np.float32))
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file at all")
    (tmp_path / "nan.npy").write_bytes(b"")
    np.save(tmp_path / "nan.npy", np.full((4, 3, 16, 16), np.nan, dtype=np.float32))
    return {"shape.npy": "shape", "dtype.npy": "dtype", "name.npz": "'input'", "nosamples.npy": "no samples",
            "empty.npy": "empty", "garbage.npz": "not a readable", "nan.npy": "NaN"}


def test_errors_are_user_errors(tmp_path):
    model = resnet_basic().model()
    for name, fragment in _files(tmp_path).items():
        with pytest.raises(UserError, match=fragment):
            load_calibration_inputs(str(tmp_path / name), model, None)
    with pytest.raises(UserError, match="calib-size"):
        load_calibration_inputs(str(tmp_path / "shape.npy"), model, 0)


def test_cli_exit_2_one_line_no_output(tmp_path, capsys):
    path = tmp_path / "in.onnx"
    onnx.save(resnet_basic().model(), path)
    cases = _files(tmp_path)
    cases["missing.npz"] = "no such file"
    for name, fragment in cases.items():
        out = tmp_path / "out.onnx"
        assert main([str(path), str(out), "--groups", "4", "--calib", str(tmp_path / name)]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert err and fragment in err[-1] and err[-1].startswith("onnxprune: error:"), (name, err)
        assert "Traceback" not in "\n".join(err)
        assert not out.exists()
