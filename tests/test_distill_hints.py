"""Feature hints for distillation (onnxprune/distillation/hints.py) and their use in distill()."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from onnxprune.distillation.distill import distill, structure_problems  # noqa: E402
from onnxprune.distillation.hints import candidates, hint_loss, with_outputs  # noqa: E402

from oracle import run  # noqa: E402
from test_distill import images, perturbed, zoo_model  # noqa: E402


def test_candidates_follow_the_rules():
    model = zoo_model()
    # the GlobalAveragePool's and the spatial ReduceMean's input (once), then also every Add output
    assert candidates(model, model, "pool") == ["sw"]
    assert candidates(model, model, "stream") == ["a", "sw", "pool"]
    assert candidates(model, model, "none") == []
    # ReduceMean with axes as an input (opset 18): the GlobalAveragePool still names the map
    assert candidates(zoo_model(opset=18), zoo_model(opset=18), "pool") == ["sw"]
    with pytest.raises(ValueError, match="hints must be one of"):
        candidates(model, model, "everything")


def test_candidates_need_the_tensor_in_the_teacher():
    student = zoo_model()
    teacher = onnx.ModelProto()
    teacher.CopyFrom(student)
    for node in teacher.graph.node:  # the teacher computes "a" under another name
        node.output[:] = ["a2" if name == "a" else name for name in node.output]
        node.input[:] = ["a2" if name == "a" else name for name in node.input]
    assert candidates(student, teacher, "stream") == ["sw", "pool"]


def test_a_graph_output_is_never_a_hint():
    model = zoo_model()
    model.graph.output.append(onnx.ValueInfoProto(name="pool"))  # a second output that is an Add's
    assert candidates(model, zoo_model(), "stream") == ["a", "sw"]


def test_with_outputs_exposes_intermediate_tensors():
    model = zoo_model()
    x = np.random.default_rng(0).random((2, 3, 12, 12), dtype=np.float32)
    logits, a, sw = run(with_outputs(model, ["a", "sw"]), {"input": x})
    assert a.shape == (2, 16, 14, 14) and sw.shape == (2, 32, 7, 7)
    np.testing.assert_allclose(logits, run(model, {"input": x})[0], rtol=1e-6)
    assert len(model.graph.output) == 1  # the input model is not changed


def test_hint_loss_is_relative_and_zero_on_a_match():
    rng = np.random.default_rng(0)
    s, t = torch.from_numpy(rng.standard_normal((2, 4, 3, 3))), torch.from_numpy(rng.standard_normal((2, 4, 3, 3)))
    assert float(hint_loss([t], [t])) == 0.0
    assert float(hint_loss([s], [t])) == pytest.approx(float(hint_loss([10 * s], [10 * t])))
    # a zero student map costs exactly 1 whatever the scale; the terms are averaged
    expected = (float(torch.mean((s - t) ** 2) / torch.mean(t ** 2)) + 1.0) / 2
    assert float(hint_loss([s, 0 * t], [t, t])) == pytest.approx(expected)


def test_distillation_with_stream_hints_trains_and_reproduces():
    teacher = zoo_model()
    student = perturbed(teacher)
    data = images()
    out, report = distill(student, teacher, data, steps=10, lr=3e-3, batch_size=16, seed=5, threads=1,
                          hints="stream")
    again, _ = distill(student, teacher, data, steps=10, lr=3e-3, batch_size=16, seed=5, threads=1, hints="stream")
    assert report["hints"] == ["a", "sw", "pool"] and report["options"]["hints"] == "stream"
    assert report["train"]["after"]["kl"] < 0.7 * report["train"]["before"]["kl"]
    assert structure_problems(student, out) == []
    assert out.SerializeToString() == again.SerializeToString()
    plain, _ = distill(student, teacher, data, steps=10, lr=3e-3, batch_size=16, seed=5, threads=1)
    assert plain.SerializeToString() != out.SerializeToString()  # the hints changed what was learnt


def test_each_hint_is_matched_with_the_teachers_tensor_of_its_name():
    """A student equal to its teacher starts at (numerically) zero loss: every target lines up
    with the student tensor of the same name (a shifted list would cost ~1 per hint)."""
    teacher = zoo_model()
    _, report = distill(teacher, teacher, images(), steps=2, lr=1e-9, batch_size=16, seed=5, threads=1,
                        hints="stream")
    assert len(report["hints"]) == 3 and report["loss_curve"]["first"] < 1e-6


def _pooled_net(width: int, seed: int) -> onnx.ModelProto:
    """input 3x8x8 -> Conv 3->width ("h") -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> 5 logits."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((width, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((5, width)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["input", "w"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "pooled", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                              ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_a_hint_whose_shape_differs_is_dropped():
    teacher, student = _pooled_net(8, 0), _pooled_net(4, 1)  # "r": 8 channels in the teacher, 4 in the student
    assert candidates(student, teacher, "pool") == ["r"]
    _, report = distill(student, teacher, images(16, shape=(3, 8, 8)), steps=2, lr=1e-3, batch_size=8, seed=0,
                        threads=1, hints="pool")
    assert report["hints"] == []
    with pytest.raises(ValueError, match="hints must be one of"):
        distill(student, teacher, images(16, shape=(3, 8, 8)), steps=1, hints="all")
