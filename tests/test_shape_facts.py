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
