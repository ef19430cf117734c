"""Shape inference runs once per model version in one ``prune()`` (issue 9; ``shape_facts.py``)."""

from pathlib import Path

import numpy as np
import onnx
import onnx.shape_inference
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.ir import shape_facts
from onnxprune.pipeline import PruneConfig, prune

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def _counting(monkeypatch):
    """Replace ``onnx.shape_inference.infer_shapes`` by a wrapper recording, per call, the model's
    op types and whether its first input has a symbolic batch (every caller looks it up there
    at call time)."""
    real = onnx.shape_inference.infer_shapes
    calls = []

    def infer_shapes(model, *args, **kwargs):
        batch = model.graph.input[0].type.tensor_type.shape.dim[0]
        calls.append({"ops": {n.op_type for n in model.graph.node},
                      "batch": batch.dim_value if batch.HasField("dim_value") else batch.dim_param,
                      "weights": sum(int(np.prod(w.dims)) for w in model.graph.initializer)})
        return real(model, *args, **kwargs)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", infer_shapes)
    shape_facts.clear_cache()
    return calls


@pytest.mark.parametrize("calib", [False, True], ids=["default", "calib"])
def test_one_shape_inference_per_model_version(monkeypatch, calib):
    """``prune()`` of the ResNet-20 sample (default mode, and with 256 calibration samples) runs
    shape inference exactly three times, once for each model version it looks at:

    1. the normalized model at the working shapes and batch 1 (MACs, the fidelity/speed planner's
       layer table, the calibration runner's tensor types; the masked working copies and the
       calibrated model differ from it only in Conv/Gemm weight values and share its facts);
    2. the model handed to the rewriter, with the input's own symbolic batch dim restored (its
       folding decisions must not rest on a size that holds only at the working shape);
    3. the rewritten model at batch 1 (the report's MACs after pruning);
    and, when the plan narrows coupled channel groups (``--coupled-rate auto``, the default), a
    4th: the dense model with its symbolic dims is then analysed for the groups and the rewriter
    gets the *narrowed* one, two symbolic versions.

    Before ``shape_facts`` the same run inferred 5 times, and 15 with calibration (twice per
    calibration of each plan the fidelity budget tried, twice in the sensitivity pass)."""
    calls = _counting(monkeypatch)
    config = PruneConfig(calib=str(SAMPLES / "fmnist_calib.npz"), calib_size=256) if calib else PruneConfig()
    pruned, report = prune(str(SAMPLES / "resnet20.onnx"), config)
    assert report["convs_pruned"] > 0
    narrowed = bool(report["coupled"] and report["coupled"]["groups"])
    assert len(calls) == 3 + narrowed, calls
    *earlier, rewritten = calls
    assert rewritten["batch"] == 1 and rewritten["weights"] < min(call["weights"] for call in earlier)
    assert [call["batch"] for call in earlier if not isinstance(call["batch"], str)] == [1]  # the normalized one
    symbolic = [call for call in earlier if isinstance(call["batch"], str)]
    assert len(symbolic) == 1 + narrowed and not any("Gather" in call["ops"] for call in earlier)


def _reshape_model(target, weight):
    """x (N x 4) -> MatMul(W) -> Reshape(target): the Reshape's target is an initializer."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("Reshape", ["y", "t"], ["z"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(weight, np.float32), "W"),
         numpy_helper.from_array(np.asarray(target, np.int64), "t")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_weight_values_keep_the_version_and_shape_inputs_do_not(monkeypatch):
    calls = _counting(monkeypatch)
    base = _reshape_model([1, 2, 2], np.eye(4))
    assert shape_facts.static_shapes_at_batch_one(base)["z"] == [1, 2, 2]
    refit = _reshape_model([1, 2, 2], 3 * np.eye(4))  # other MatMul weights: same version
    assert shape_facts.static_shapes_at_batch_one(refit)["z"] == [1, 2, 2]
    assert len(calls) == 1
    other = _reshape_model([1, 4, 1], np.eye(4))  # another Reshape target: a new version
    assert shape_facts.static_shapes_at_batch_one(other)["z"] == [1, 4, 1]
    assert len(calls) == 2
    assert shape_facts.tensor_shapes(base)["y"] == ["N", 4] and len(calls) == 3


def test_facts_are_copies(monkeypatch):
    _counting(monkeypatch)
    model = _reshape_model([1, 2, 2], np.eye(4))
    shape_facts.static_shapes_at_batch_one(model)["z"].append(7)
    shape_facts.tensor_shapes(model)["y"][0] = 99
    assert shape_facts.static_shapes_at_batch_one(model)["z"] == [1, 2, 2]
    assert shape_facts.tensor_shapes(model)["y"] == ["N", 4]


def _computed_pads_model():
    """``torch.nn.functional.pad`` as PyTorch exports it before opset 18: the pads are built from
    constants in the graph (``ConstantOfShape`` → ``Concat`` → ``Reshape`` → reversing ``Slice`` →
    ``Transpose`` → ``Reshape`` → ``Cast``), then a 3x3 Conv, a ReLU and a 1x1 Conv
    (yahoo-open-nsfw==1.0.0's pattern before each of its Convs)."""
    def const(name, values):
        return numpy_helper.from_array(np.array(values, dtype=np.int64), name)

    nodes = [
        helper.make_node("ConstantOfShape", ["four"], ["zeros"],
                         value=helper.make_tensor("v", TensorProto.INT64, [1], [0])),
        helper.make_node("Concat", ["spatial_pads", "zeros"], ["flat"], axis=0),
        helper.make_node("Reshape", ["flat", "pairs"], ["paired"]),
        helper.make_node("Slice", ["paired", "start", "stop", "axis0", "back"], ["reversed"]),
        helper.make_node("Transpose", ["reversed"], ["by_side"], perm=[1, 0]),
        helper.make_node("Reshape", ["by_side", "flat_shape"], ["pads64"]),
        helper.make_node("Cast", ["pads64"], ["pads"], to=TensorProto.INT64),
        helper.make_node("Pad", ["x", "pads"], ["padded"]),
        helper.make_node("Conv", ["padded", "w1"], ["c1"], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["y"]),
    ]
    rng = np.random.default_rng(0)
    inits = [const("four", [4]), const("spatial_pads", [1, 1, 1, 1]), const("pairs", [-1, 2]),
             const("start", [-1]), const("stop", [-(2 ** 63)]), const("axis0", [0]), const("back", [-1]),
             const("flat_shape", [-1]),
             numpy_helper.from_array(rng.standard_normal((32, 16, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((32, 32, 1, 1)).astype(np.float32), "w2")]
    graph = helper.make_graph(nodes, "computed_pads",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32, "h", "w"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_shapes_computed_in_the_graph_come_from_ort_symbolic_inference():
    """onnx's inference cannot follow the computed pads, so the Convs had no shapes and the
    planner skipped them ("spatial shape unknown"); ORT's symbolic inference fills them in."""
    shape_facts.clear_cache()
    model = _computed_pads_model()
    onnx_only = shape_facts.static_shapes(onnx.shape_inference.infer_shapes(
        shape_facts._fixed_at_batch_one(model), data_prop=True))
    assert "c1" not in onnx_only  # what onnx alone knows (the premise of the fallback)
    static = shape_facts.static_shapes_at_batch_one(model, None)
    assert static["padded"][1] == 16 and static["c1"][:2] == [1, 32] and static["y"][:2] == [1, 32]
    declared = shape_facts.tensor_shapes(model)
    assert declared["c1"][1] == 32 and declared["r1"][1] == 32 and declared["y"][1] == 32
    _, report = prune(model, PruneConfig(input_shapes=[("x", [1, 16, 32, 32])]))
    assert report["convs_pruned"] >= 1 and report["verify"]["passed"]
    assert not any("spatial shape unknown" in layer.get("skipped", "") for layer in report["layers"])


def test_a_model_onnx_can_infer_never_asks_ort():
    """ORT's tool runs only where onnx leaves a Conv without a shape: every other model's facts
    (and so its output bytes) are onnx's alone."""
    shape_facts.clear_cache()
    calls = []
    real = shape_facts._symbolic
    shape_facts._symbolic = lambda model: calls.append(1) or real(model)
    try:
        model = onnx.load(SAMPLES / "resnet20.onnx")
        shape_facts.static_shapes_at_batch_one(model)
        shape_facts.tensor_shapes(model)
        assert calls == []
        shape_facts.static_shapes_at_batch_one(_computed_pads_model(), None)
        assert calls == [1]
    finally:
        shape_facts._symbolic = real


def test_ort_inference_that_cannot_finish_leaves_no_files_and_keeps_what_it_found(tmp_path, monkeypatch):
    """ORT's public ``infer_shapes`` saved the whole model (weights in a uuid-named data file) into
    the working directory whenever one op defeated it, on every run; the gaps before that op are
    kept now and nothing is written."""
    shape_facts.clear_cache()
    model = _computed_pads_model()
    custom = helper.make_node("Mystery", ["y"], ["z"], domain="example.custom")
    model.graph.node.append(custom)
    del model.graph.output[:]
    model.graph.output.extend([helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    model.opset_import.append(helper.make_opsetid("example.custom", 1))
    monkeypatch.chdir(tmp_path)
    static = shape_facts.static_shapes_at_batch_one(model, None)
    assert list(tmp_path.iterdir()) == []
    assert static["c1"][:2] == [1, 32]  # found before the op ORT does not know
