"""Accuracy harness (onnxprune.checks.evaluate) on tiny hand-built ONNX models with known answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.checks import evaluate as ev
from onnxprune.commands import eval as eval_cmd
from onnxprune.errors import UserError

C = 4  # classes; images are N x 1 x 1 x C and the "logits" are the pixels (times a scale)


def _flatten_model(path: Path, scale: float = 1.0, perm=None) -> Path:
    """logits = Flatten(x) @ W with W = scale * (permuted) identity; symbolic batch."""
    w = np.eye(C, dtype=np.float32) * scale
    if perm is not None:
        w = w[:, perm]
    g = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"], axis=1),
         helper.make_node("MatMul", ["f", "W"], ["logits"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 1, C])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", C])],
        [numpy_helper.from_array(w, "W")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))
    return path


def _data():
    """10 images; argmax of image i is pred[i]; labels agree for 7 of 10 (class 3 never right)."""
    pred = np.array([0, 0, 1, 1, 2, 2, 3, 3, 0, 1])
    labels = np.array([0, 0, 1, 1, 2, 2, 0, 1, 0, 3])  # wrong: idx 6, 7, 9
    x = np.full((10, 1, 1, C), 0.1, dtype=np.float32)
    x[np.arange(10), 0, 0, pred] = 0.9
    return x, labels


@pytest.fixture
def tiny(tmp_path):
    return _flatten_model(tmp_path / "tiny.onnx")


def test_predict_logits_batches_and_symbolic_batch(tiny):
    x, _ = _data()
    for bs in (1, 3, 256):
        logits = ev.predict_logits(tiny, x, batch_size=bs)
        assert logits.shape == (10, C) and logits.dtype == np.float32
        np.testing.assert_allclose(logits, x.reshape(10, C), atol=1e-6)


def test_evaluate_known_accuracy_and_per_class(tiny):
    x, y = _data()
    r = ev.evaluate(tiny, (x, y))
    assert r["top1"] == pytest.approx(0.7)
    assert r["correct"] == 7 and r["num_images"] == 10
    pc = r["per_class"]
    # class 0: 3/4 right (idx 6 predicted 3), class 1: 2/3, class 2: 2/2, class 3: 0/1
    assert pc["accuracy"] == pytest.approx([0.75, 2 / 3, 1.0, 0.0])
    assert pc["min"] == 0.0 and pc["min_class"] == "class3"
    assert pc["max"] == 1.0 and pc["max_class"] == "class2"
    assert r["reference"] is None
    json.dumps(r)  # serialisable


def test_reference_against_itself_is_perfect(tiny):
    x, y = _data()
    ref = ev.evaluate(tiny, (x, y), reference=tiny)["reference"]
    assert ref["agreement"] == 1.0
    assert ref["mean_kl"] == pytest.approx(0.0, abs=1e-12)
    assert ref["max_abs_logit_diff"] == 0.0
    assert ref["top1"] == pytest.approx(0.7)


def test_reference_metrics_known_values(tmp_path):
    x, y = _data()
    a = _flatten_model(tmp_path / "a.onnx", scale=1.0)
    b = _flatten_model(tmp_path / "b.onnx", scale=2.0)  # same argmax, sharper softmax
    r = ev.evaluate(b, (x, y), reference=a)["reference"]
    assert r["agreement"] == 1.0
    assert r["max_abs_logit_diff"] == pytest.approx(0.9, abs=1e-6)
    la, lb = ev.log_softmax(x.reshape(10, C)), ev.log_softmax(2 * x.reshape(10, C))
    kl = (np.exp(la) * (la - lb)).sum(1).mean()
    assert r["mean_kl"] == pytest.approx(kl, rel=1e-6) and r["mean_kl"] > 0
    perm = [1, 0, 2, 3]  # swaps classes 0 and 1 in the output
    c = _flatten_model(tmp_path / "c.onnx", perm=perm)
    r = ev.evaluate(c, (x, y), reference=a)["reference"]
    pred = x.reshape(10, C).argmax(1)
    assert r["agreement"] == pytest.approx(np.isin(pred, [2, 3]).mean())


def test_logits_arrays_accepted():
    x, y = _data()
    logits = x.reshape(10, C)
    r = ev.evaluate(logits, (x, y), reference=logits * 3)
    assert r["top1"] == pytest.approx(0.7) and r["reference"]["agreement"] == 1.0


def test_load_npz_uint8_and_description(tmp_path):
    imgs = (np.arange(5 * 28 * 28) % 256).astype(np.uint8).reshape(5, 28, 28)
    p = tmp_path / "d.npz"
    np.savez(p, images=imgs, labels=np.arange(5))
    d = ev.load_npz(p)
    assert d.images.shape == (5, 1, 28, 28) and d.images.dtype == np.float32
    assert d.images.max() <= 1.0 and d.labels.dtype == np.int64
    assert str(p) in d.description
    assert eval_cmd.load_dataset(p).description == d.description


def test_load_dataset_default_says_which():
    d = eval_cmd.load_dataset(None)
    if eval_cmd.full_test_set_available():
        assert len(d.labels) == 10000 and "full" in d.description
    else:
        assert len(d.labels) == 2000 and "subset" in d.description
    s = eval_cmd.load_dataset(None, prefer="subset")
    assert len(s.labels) == 2000 and np.bincount(s.labels).tolist() == [200] * 10
    assert s.images.shape == (2000, 1, 28, 28) and 0 <= s.images.min() and s.images.max() <= 1


def test_user_errors_raised(tmp_path, tiny):
    with pytest.raises(UserError):
        ev.predict_logits(tmp_path / "missing.onnx", np.zeros((1, 1, 1, C), np.float32))
    with pytest.raises(UserError, match="expects shape"):
        ev.predict_logits(tiny, np.zeros((2, 1, 28, 28), np.float32))
    with pytest.raises(UserError, match="labels go up to"):
        x, _ = _data()
        ev.evaluate(tiny, (x, np.full(10, 7)))


# ----------------------------------------------------------------------------- CLI


def _cli(capsys, *argv):
    rc = eval_cmd.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_one_line_error(rc, err, needle):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("onnxprune eval: error: ")
    assert needle in lines[0]
    assert "Traceback" not in err


def test_cli_ok_with_json(tmp_path, tiny, capsys):
    x, y = _data()
    data = tmp_path / "d.npz"
    np.savez(data, images=x, labels=y)
    out_json = tmp_path / "r.json"
    rc, out, err = _cli(capsys, tiny, "--data", data, "--reference", tiny, "--json", out_json)
    assert rc == 0, err
    assert "top-1:     70.00% (7/10)" in out
    assert "agreement 100.00%" in out
    r = json.loads(out_json.read_text())
    assert r["top1"] == pytest.approx(0.7) and r["reference"]["mean_kl"] == pytest.approx(0)


def test_cli_missing_model(tmp_path, capsys):
    rc, _, err = _cli(capsys, tmp_path / "nope.onnx", "--subset")
    _assert_one_line_error(rc, err, "model file not found")


def test_cli_not_onnx(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_text("this is not a protobuf\n" * 10)
    x, y = _data()
    data = tmp_path / "d.npz"
    np.savez(data, images=x, labels=y)
    rc, _, err = _cli(capsys, bad, "--data", data)
    _assert_one_line_error(rc, err, "not a loadable ONNX model")


def test_cli_bad_npz(tmp_path, tiny, capsys):
    no_labels = tmp_path / "nolabels.npz"
    np.savez(no_labels, images=np.zeros((3, 1, 1, C), np.float32))
    rc, _, err = _cli(capsys, tiny, "--data", no_labels)
    _assert_one_line_error(rc, err, "'images' and 'labels'")

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x00\x01 not a zip")
    rc, _, err = _cli(capsys, tiny, "--data", garbage)
    _assert_one_line_error(rc, err, "not a readable .npz")

    mismatch = tmp_path / "mismatch.npz"
    np.savez(mismatch, images=np.zeros((3, 1, 1, C), np.float32), labels=np.zeros(4, np.int64))
    rc, _, err = _cli(capsys, tiny, "--data", mismatch)
    _assert_one_line_error(rc, err, "'labels' must have shape (3,)")

    rc, _, err = _cli(capsys, tiny, "--data", tmp_path / "missing.npz")
    _assert_one_line_error(rc, err, "data file not found")


def test_cli_shape_mismatch(tmp_path, tiny, capsys):
    rc, _, err = _cli(capsys, tiny, "--subset")  # tiny expects N x 1 x 1 x 4, subset is 28x28
    _assert_one_line_error(rc, err, "expects shape")


def test_cli_usage_errors_are_one_line(tiny, capsys):
    rc, _, err = _cli(capsys, tiny, "--full", "--subset")
    _assert_one_line_error(rc, err, "not allowed with")
    rc, _, err = _cli(capsys)
    _assert_one_line_error(rc, err, "required")
    rc, _, err = _cli(capsys, tiny, "--batch-size", "0", "--subset")
    _assert_one_line_error(rc, err, "--batch-size")


def test_cli_help_exits_zero(capsys):
    rc, out, _ = _cli(capsys, "--help")
    assert rc == 0 and "onnxprune eval" in out
