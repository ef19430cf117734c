"""Issue 12, dynamic spatial sizes: a model with a symbolic N×3×H×W input prunes and verifies in
one command; ``--input-shape`` (or the calibration data, or the default rule of shapes.py) fixes
the shapes used for MACs, planning, calibration and verification, and the output keeps the
symbolic dims. Bad ``--input-shape`` values are one line, exit 2, before any work."""

import json

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxprune.pipeline as pipeline
from graphs import GraphBuilder
from onnxprune.cli import main
from onnxprune.ir.normalize import normalize
from onnxprune.ir.shapes import DEFAULT_DIM, parse_input_shape, resolve_input_shapes, with_input_shapes
from onnxprune.checks.verify import verify


def _detector():
    """A tiny detector: Conv stack with two stride-2 stages, a 1-channel Sigmoid map; built at
    32×32 (its MACs known there), then the input's H and W made symbolic."""
    b = GraphBuilder(size=32)
    x = b.relu(b.conv("input", 16))
    x = b.relu(b.conv(x, 32, stride=2))
    x = b.relu(b.conv(x, 32))
    x = b.relu(b.conv(x, 32, stride=2))
    x = b.relu(b.conv(x, 32))
    b.output(b._op("Sigmoid", [b.conv(x, 1, k=1)]))
    model = b.model()
    for dims, names in ((model.graph.input[0].type.tensor_type.shape.dim, ("H", "W")),
                        (model.graph.output[0].type.tensor_type.shape.dim, ("h", "w"))):
        for dim, name in zip(dims[2:], names):
            dim.Clear()
            dim.dim_param = name
    onnx.checker.check_model(model, full_check=True)
    return model, b.macs()  # MACs at 32x32


def _dims(model):
    return [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]


@pytest.fixture
def detector(tmp_path):
    model, macs_at_32 = _detector()
    path = tmp_path / "det.onnx"
    onnx.save(model, path)
    return path, macs_at_32


@pytest.mark.parametrize("extra, dims, source, area", [
    ([], [None, 3, DEFAULT_DIM, DEFAULT_DIM], "default", DEFAULT_DIM ** 2),
    (["--groups", "8"], [None, 3, DEFAULT_DIM, DEFAULT_DIM], "default", DEFAULT_DIM ** 2),
    (["--input-shape", "input=1x3x64x96"], [None, 3, 64, 96], "--input-shape", 64 * 96),
    (["--groups", "8", "--input-shape", "1x3x64x96"], [None, 3, 64, 96], "--input-shape", 64 * 96),
], ids=["default", "groups8", "input-shape", "groups8-bare-shape"])
def test_symbolic_spatial_input_prunes_and_verifies(tmp_path, detector, extra, dims, source, area, capsys):
    path, macs_at_32 = detector
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    assert main([str(path), str(out), "--report", str(report), *extra]) == 0
    err = capsys.readouterr().err
    assert "input shapes for MACs, planning, calibration and verification: input=Nx3x" in err
    assert ("--input-shape NAME=DIMS" in err) == (source == "default")
    data = json.loads(report.read_text())
    assert data["input_shapes"] == {"input": {"dims": dims, "source": source}}
    assert data["verify"]["passed"] and data["convs_pruned"] >= 1
    assert data["macs_before"] == macs_at_32 * area // (32 * 32)  # counted at the working shape
    pruned = onnx.load(out)
    assert _dims(pruned) == ["N", 3, "H", "W"]  # the output keeps the symbolic dims
    onnx.checker.check_model(pruned, full_check=True)


def test_calibration_data_sets_the_shape(tmp_path, detector):
    path, macs_at_32 = detector
    calib, out, report = tmp_path / "calib.npy", tmp_path / "out.onnx", tmp_path / "r.json"
    np.save(calib, np.random.default_rng(0).random((8, 3, 48, 64), dtype=np.float32))
    assert main([str(path), str(out), "-q", "--calib", str(calib), "--min-agreement", "off",
                 "--target-macs", "0.7", "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["input_shapes"]["input"] == {"dims": [None, 3, 48, 64], "source": "calibration data"}
    assert data["macs_before"] == macs_at_32 * 48 * 64 // (32 * 32) and data["verify"]["passed"]
    assert _dims(onnx.load(out)) == ["N", 3, "H", "W"]


def test_calibration_data_must_match_the_given_shape(tmp_path, detector, capsys):
    path, _ = detector
    calib = tmp_path / "calib.npy"
    np.save(calib, np.zeros((4, 3, 48, 64), np.float32))
    assert main([str(path), str(tmp_path / "o.onnx"), "-q", "--calib", str(calib),
                 "--input-shape", "input=1x3x64x64"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "calib" in err[0] and "64" in err[0], err


@pytest.fixture
def no_work(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("work started before --input-shape was checked")
    monkeypatch.setattr(pipeline, "normalize", fail)


@pytest.mark.parametrize("value, fragment", [
    ("input=1x3xHx64", "expected dimensions separated by 'x'"),
    ("input=", "expected dimensions"),
    ("=1x3x64x64", "expected NAME=DIMS"),
    ("input=1x3x0x64", "must be positive"),
    ("input=1x3x-64x64", "must be positive"),
])
def test_bad_input_shape_syntax_is_a_usage_error(tmp_path, detector, value, fragment, capsys, no_work):
    with pytest.raises(SystemExit) as exc:
        main([str(detector[0]), str(tmp_path / "o.onnx"), "--input-shape", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and fragment in err[0] and "--input-shape" in err[0], err


@pytest.mark.parametrize("values, fragment", [
    (["images=1x3x64x64"], "the model has no input 'images' (inputs: input)"),
    (["input=1x3x64"], "has rank 4, got 3 dimensions"),
    (["input=1x4x64x64"], "axis 1 of 'input' is fixed at 3 in the model, got 4"),
    (["input=1x3x64x64", "input=1x3x32x32x4"], "has rank 4, got 5 dimensions"),  # a further shape is checked too
])
def test_input_shape_that_does_not_fit_the_model(tmp_path, detector, values, fragment, capsys, no_work):
    argv = [str(detector[0]), str(tmp_path / "o.onnx")]
    for value in values:
        argv += ["--input-shape", value]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "o.onnx").exists()


def test_a_model_that_cannot_run_at_the_default_shape_fails_before_planning(tmp_path, capsys, no_work):
    """A head whose Reshape target was baked in at 32×32 cannot run at 224: exit 2 at once, with
    the hint to give the size."""
    b = GraphBuilder(size=32)
    x = b.relu(b.conv("input", 16, stride=2))  # [N, 16, 16, 16]
    flat = b._op("Reshape", [x, b._const("flat", [0, 16 * 16 * 16], dtype=np.int64)])
    b.shape[flat] = (16 * 16 * 16,)
    b.output(b.gemm(flat, 4))
    model = b.model()
    for dim, name in zip(model.graph.input[0].type.tensor_type.shape.dim[2:], "HW"):
        dim.Clear()
        dim.dim_param = name
    path = tmp_path / "fixed_head.onnx"
    onnx.save(model, path)
    assert main([str(path), str(tmp_path / "o.onnx"), "-q"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "input=1x3x224x224" in err[0] and "--input-shape NAME=DIMS" in err[0], err


def test_parse_and_resolve():
    assert parse_input_shape("x=1x3x640x640") == ("x", (1, 3, 640, 640))
    assert parse_input_shape("a=b=1,3,8,8") == ("a=b", (1, 3, 8, 8))
    assert parse_input_shape("1x3x8x8") == (None, (1, 3, 8, 8))
    model, _ = _detector()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].Clear()
    dims[2].dim_value = -1  # Paddle writes -1 for a symbolic dimension
    shape = resolve_input_shapes(model)["input"]
    assert shape.dims == (None, 3, DEFAULT_DIM, DEFAULT_DIM) and shape.source == "default"
    samples = {"input": np.zeros((2, 3, 40, 56), np.float32)}
    assert resolve_input_shapes(model, {"input": (1, 3, 64, 64)}, samples)["input"].dims == (None, 3, 64, 64)
    assert resolve_input_shapes(model, None, samples)["input"].dims == (None, 3, 40, 56)
    static = helper.make_tensor_value_info("s", onnx.TensorProto.FLOAT, [1, 3, 8, 8])
    model.graph.input[0].CopyFrom(static)
    assert resolve_input_shapes(model)["s"].source == "model"


def test_the_rewrite_holds_at_other_sizes_than_the_working_one(tmp_path):
    """AveragePool(7) makes a 1x1 map at 28x28 only: a Flatten after it is a channel-preserving
    reshape there but mixes channels with space at 56x56. The rewrite must not pass a channel
    permutation through it on the strength of the working shape."""
    b = GraphBuilder(size=28)
    x = b.relu(b.conv("input", 16))
    x = b.relu(b.conv(x, 32, stride=2))
    x = b.relu(b.conv(x, 32, stride=2))  # [N, 32, 7, 7] at 28x28
    pooled = b._op("AveragePool", [x], kernel_shape=[7, 7], strides=[7, 7])
    flat = b._op("Flatten", [pooled], axis=1)
    b.shape[flat] = (32,)
    b.output(flat)
    model = b.model()
    for value_info in (model.graph.input[0], model.graph.output[0]):
        dims = value_info.type.tensor_type.shape.dim
        for dim, name in zip(dims[2:] if len(dims) == 4 else dims[1:], "HW" if len(dims) == 4 else "F"):
            dim.Clear()
            dim.dim_param = name
    pruned, report = pipeline.prune(model, pipeline.PruneConfig(groups=4, rate=0.5,
                                                                input_shapes={"input": (1, 3, 28, 28)}))
    assert report["convs_pruned"] >= 1 and report["verify"]["passed"]
    at_56 = {"input": (1, 3, 56, 56)}
    reference = normalize(with_input_shapes(model, resolve_input_shapes(model, at_56)))
    result = verify(reference, pruned, report.plan)
    assert result.passed, result


def test_further_shapes_of_an_input_are_verified_too(tmp_path, detector, capsys):
    """``--input-shape`` given again for the same input: the first is the working shape (MACs,
    planning, calibration), each further one is a size the output is verified at as well."""
    path, macs_at_32 = detector
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    assert main([str(path), str(out), "--report", str(report), "--groups", "8", "--input-shape", "input=1x3x64x96",
                 "--input-shape", "input=1x3x40x56", "--input-shape", "input=1x3x64x96",
                 "--input-shape", "input=4x3x64x96"]) == 0
    assert "verifying again at input=Nx3x40x56" in capsys.readouterr().err
    data = json.loads(report.read_text())
    assert data["input_shapes"]["input"]["dims"] == [None, 3, 64, 96]
    assert data["macs_before"] == macs_at_32 * 64 * 96 // (32 * 32)
    (other,) = data["verify"]["other_shapes"]  # the working shape (again, or at another batch) once
    assert other["input_shapes"] == "input=Nx3x40x56" and other["passed"] and other["max_rel_diff"] <= 1e-4


def _conv_head_with_state(name, x_dims, state_dims):
    """Two Convs on ``x``, pooled, concatenated with the sum of ``state`` over its first axis, then
    a MatMul head: ``x``'s batch and ``state``'s second axis must agree (a recurrent state's shape)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in
             [("w1", (32, 3, 3, 3)), ("w2", (32, 32, 3, 3)), ("fc", (48, 10))]]
    inits.append(numpy_helper.from_array(np.array([0], np.int64), "axis0"))
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("GlobalAveragePool", ["c2"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("ReduceSum", ["state", "axis0"], ["s"], keepdims=0),
             helper.make_node("Concat", ["f", "s"], ["joined"], axis=1),
             helper.make_node("MatMul", ["joined", "fc"], ["y"])]
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_dims),
                      helper.make_tensor_value_info("state", TensorProto.FLOAT, state_dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_batch_size_two_inputs_share_at_other_axes_stays_shared():
    """silero-vad's inputs: ``input`` is ``batch x 512`` and ``state`` ``2 x batch x 128``.
    Verification fed batch 2 to one and the given size to the other, and no --input-shape could
    make them agree; a named size that is a batch axis now stays open wherever it is declared."""
    from onnxprune.pipeline import PruneConfig, prune

    model = _conv_head_with_state("shared", ["batch", 3, 8, 8], [2, "batch", 16])
    _, report = prune(model, PruneConfig(rate=0.5, groups=1, min_channels=8,
                                         input_shapes={"state": (2, 1, 16)}))
    assert report["verify"]["passed"] and report["convs_pruned"] == 1
    _, report = prune(model, PruneConfig(rate=0.5, groups=1, min_channels=8))
    assert report["verify"]["passed"]


def test_a_batch_pinned_to_one_by_a_fixed_state_input_is_verified_at_batch_one(tmp_path, capsys):
    """AECMOS (speechmos): ``input`` is ``batch_size x 3 x frames x 160`` but its GRU state ``h0``
    is fixed at ``4 x 1 x 96``, so the model runs at batch 1 only. Planning ran (at batch 1), then
    verification fed batch 2 and failed with exit 2, telling the user to give --input-shape, which
    cannot change it. A model that runs at batch 1 and not at the verification batch is verified at
    batch 1 (as a model with a fixed batch is), and the report says so."""
    model = _conv_head_with_state("pinned", ["batch", 3, "frames", 8], [2, 1, 16])  # batch of x == 1 (state's)
    path, out, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(model, path)
    code = main([str(path), str(out), "--groups", "1", "--rate", "0.5", "--min-channels", "8",
                 "--input-shape", "x=1x3x8x8", "--report", str(report), "--precision", "fp16"])
    err = capsys.readouterr().err
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["verify"]["passed"] and data["verify"]["batch"] == 1 and data["convs_pruned"] == 1
    assert "batch 1" in err


def test_an_fp16_model_pinned_to_batch_one_is_verified_at_batch_one():
    """The same pinned model as an fp16 output pruned again: verification compares fp32 copies and
    then runs the fp16 rewrite as it is, which it did at batch 2 before the comparison (an internal
    error on a model that runs at batch 1 only)."""
    from onnxprune.pipeline import PruneConfig, prune
    from onnxprune.rewriting.precision import to_fp16

    half, _ = to_fp16(_conv_head_with_state("pinned", ["batch", 3, "frames", 8], [2, 1, 16]))
    _, report = prune(half, PruneConfig(rate=0.5, groups=1, min_channels=8, input_shapes={"x": (1, 3, 8, 8)}))
    assert report["verify"]["passed"] and report["verify"]["batch"] == 1 and report["convs_pruned"] == 1
