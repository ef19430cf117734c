"""Issue 12, "0 tracebacks": models the planners cannot time or count (Conv1D/Conv3D, weights
computed by ops, tensors of unknown rank, IR 3 initializer-inputs, CRNN sequence heads) prune
what they can and say why the rest stays dense; the output never needs an input the original
did not."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphs import GraphBuilder, resnet_basic
from onnxprune.cli import main
from onnxprune.ir.macs import count_macs, inferred_at_batch_one, static_shapes
from onnxprune.ir.normalize import normalize
from onnxprune.pipeline import PruneConfig, prune
from onnxprune.checks.verify import required_inputs, verify

MODES = [[], ["--planner", "speed"], ["--groups", "8"], ["--target-macs", "0.5"]]


def _init(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _conv_nd(rank):
    """Two Convs of ``rank`` spatial dims (1: Conv1D, 3: Conv3D), 32 channels each."""
    rng = np.random.default_rng(0)
    size = [6] * rank
    nodes, inits, x = [], [], "x"
    for i in range(2):
        inits.append(_init(f"w{i}", rng.standard_normal((32, 32) + (3,) * rank) * 0.1))
        nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1] * (2 * rank)),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32] + size)],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 32] + size)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)


def _computed_weights():
    """Conv weights produced by an op (weight * scale), not initializers."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(2):
        inits += [_init(f"w{i}", rng.standard_normal((32, 32, 3, 3)) * 0.1), _init(f"s{i}", [1.0])]
        nodes += [helper.make_node("Mul", [f"w{i}", f"s{i}"], [f"wm{i}"], name=f"scale{i}"),
                  helper.make_node("Conv", [x, f"wm{i}"], [f"c{i}"], name=f"conv{i}", pads=[1] * 4)]
        x = f"c{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32, 8, 8])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 32, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: " ".join(m) or "default")
@pytest.mark.parametrize("make, reason", [(lambda: _conv_nd(1), "not a 2-D convolution (weight rank 3)"),
                                          (lambda: _conv_nd(3), "not a 2-D convolution (weight rank 5)"),
                                          (_computed_weights, "weight is not a constant")],
                         ids=["conv1d", "conv3d", "computed-weights"])
def test_nothing_plannable_exits_0_with_the_reason(tmp_path, make, reason, mode, capsys):
    src, out, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(make(), src)
    assert main([str(src), str(out), "-q", "--report", str(report), *mode]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("onnxprune: warning: no Conv was pruned") and reason in err[0], err
    data = json.loads(report.read_text())
    assert data["convs_pruned"] == 0 and data["verify"]["passed"]
    assert all(reason in layer["skipped"] for layer in data["layers"])


def test_a_model_without_a_conv_exits_0(tmp_path, capsys):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    src = tmp_path / "in.onnx"
    onnx.save(model, src)
    assert main([str(src), str(tmp_path / "o.onnx"), "-q"]) == 0
    assert capsys.readouterr().err.strip() == "onnxprune: warning: no Conv was pruned: the model has no Conv"


# -- tensors of unknown rank (what shape inference leaves after a Reshape it cannot follow) ----

def _crnn(sequence="flatten"):
    """A CRNN-style recogniser: a Conv stack to [N, 32, 4, 4], then a sequence head, a MatMul with
    a constant over [N, T, features]. ``sequence``:
    - "flatten" (PaddleOCR's export): Reshape to [N, C, H*W] with the target computed as
      Concat(Shape(x)[:2], [-1]), Transpose; onnx shape inference leaves the Reshape's output
      without a shape (unknown rank) at opset 13, which the MACs count once read as a scalar
      (IndexError with a fixed batch);
    - "mix": Reshape [N, C*H, W] (channels mixed with the height), Transpose."""
    b = GraphBuilder(size=16, opset=13, batch=1)
    x = b.relu(b.conv("input", 16))
    x = b.relu(b.conv(x, 32, stride=2))
    x = b.relu(b.conv(x, 32))
    x = b.relu(b.conv(x, 32, stride=2))  # [N, 32, 4, 4]
    if sequence == "flatten":
        b.nodes.append(helper.make_node("Shape", [x], ["feature_shape"], name="shape"))
        ends = [b._const(name, value, dtype=np.int64) for name, value in (("s0", [0]), ("s2", [2]), ("ax", [0]))]
        b.nodes.append(helper.make_node("Slice", ["feature_shape", *ends], ["nc"], name="slice"))
        b.nodes.append(helper.make_node("Concat", ["nc", b._const("m1", [-1], dtype=np.int64)], ["seq_shape"],
                                        name="concat_shape", axis=0))
        seq, steps, features = b._op("Reshape", [x, "seq_shape"]), 16, 32
    else:
        seq, steps, features = b._op("Reshape", [x, b._const("seq_shape", [0, 128, 4], dtype=np.int64)]), 4, 128
    seq = b._op("Transpose", [seq], perm=[0, 2, 1])
    logits = b._op("MatMul", [seq, b._const("head", b.rng.standard_normal((features, 10)) * 0.1)])
    b.shape[logits] = (steps, 10)
    b.output(logits)
    return b.model()


def test_static_shapes_skip_tensors_of_unknown_rank():
    inferred = inferred_at_batch_one(_crnn())
    shapes = static_shapes(inferred)
    unknown = [vi.name for vi in inferred.graph.value_info if not vi.type.tensor_type.HasField("shape")]
    assert unknown and not any(name in shapes for name in unknown)  # unknown rank is not a scalar ([])
    total, per_node = count_macs(_crnn())
    assert total == sum(per_node.values()) > 0


@pytest.mark.parametrize("mode", MODES[:3], ids=lambda m: " ".join(m) or "default")
@pytest.mark.parametrize("sequence", ["flatten", "mix"])
def test_crnn_recogniser_prunes_and_verifies(tmp_path, mode, sequence):
    src, out, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(_crnn(sequence), src)
    assert main([str(src), str(out), "-q", "--rate", "0.5", "--report", str(report), *mode]) == 0
    data = json.loads(report.read_text())
    assert data["convs_pruned"] >= 1 and data["verify"]["passed"], data["layers"]
    onnx.checker.check_model(onnx.load(out), full_check=True)


# -- initializers listed as graph inputs -------------------------------------------------

def _with_initializer_inputs(ir_version, listed=None):
    """resnet_basic with its initializers (all, or the first ``listed``) also listed as graph
    inputs, plus an unused initializer-input ``unused_w``."""
    model = resnet_basic().model()
    graph = model.graph
    chosen = list(graph.initializer) if listed is None else list(graph.initializer)[:listed]
    graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in chosen)
    graph.initializer.append(_init("unused_w", np.ones(4)))
    graph.input.append(helper.make_tensor_value_info("unused_w", TensorProto.FLOAT, [4]))
    model.ir_version = ir_version
    if ir_version < 4:
        del model.opset_import[:]
        model.opset_import.append(helper.make_opsetid("", 9))
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("mode", [[], ["--groups", "4"]], ids=["default", "groups4"])
def test_ir3_initializer_inputs_are_weights(tmp_path, mode):
    """IR 3 lists every weight as an input (ONNX Runtime treats them as constants there): its
    Convs prune, and the output is IR 3 again with every initializer listed and nothing required
    but the real input."""
    src, out, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(_with_initializer_inputs(3), src)
    assert main([str(src), str(out), "-q", "--report", str(report), "--rate", "0.5", *mode]) == 0
    data = json.loads(report.read_text())
    assert data["convs_pruned"] >= 1 and data["verify"]["passed"]
    pruned = onnx.load(out)
    onnx.checker.check_model(pruned, full_check=True)  # IR 3: every initializer is an input
    assert pruned.ir_version == 3 and required_inputs(pruned) == ["input"]
    assert {i.name for i in pruned.graph.input} == {"input"} | {t.name for t in pruned.graph.initializer}


def test_overridable_initializer_inputs_stay_inputs(tmp_path):
    """IR >= 4: an initializer listed as an input is an overridable default. Its Conv stays dense
    (with the reason), and an unused one keeps both its input and its initializer."""
    src, out, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(_with_initializer_inputs(8, listed=1), src)  # conv1.weight is overridable
    assert main([str(src), str(out), "-q", "--groups", "4", "--report", str(report)]) == 0
    pruned = onnx.load(out)
    assert required_inputs(pruned) == ["input"]
    assert {"unused_w", "conv1.weight"} <= {i.name for i in pruned.graph.input} & \
        {t.name for t in pruned.graph.initializer}
    layers = {layer["name"]: layer for layer in json.loads(report.read_text())["layers"]}
    assert "graph input" in layers["conv1"]["skipped"]


def test_verify_notices_a_new_required_input():
    model = _with_initializer_inputs(8, listed=0)
    pruned, report = prune(model, PruneConfig(groups=4, verify=False))
    assert verify(normalize(model), pruned, report.plan, original=model).passed
    kept = [t for t in pruned.graph.initializer if t.name != "unused_w"]
    del pruned.graph.initializer[:]
    pruned.graph.initializer.extend(kept)  # its input stays: now a required one
    result = verify(normalize(model), pruned, report.plan, original=model)
    assert not result.passed and result.new_required_inputs == ["unused_w"]
