"""Which axis of an output holds class scores (``checks/class_scores.py``), and the fidelity
numbers that read it: a recogniser's ``[N, T, C]`` output is compared per time step over C (not
an argmax over time), and a Softmax's probabilities are compared as log-probabilities."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.calibration.calib_stream import compare_first_output, first_output
from onnxprune.checks.class_scores import OutputKind, as_logits, class_axis, output_kind
from onnxprune.checks.evaluate import predict_logits
from onnxprune.errors import UserError
from onnxprune.pipeline import PruneConfig, prune
from oracle import run


def recogniser(softmax_axis: int | None = 2, opset: int = 17, classes: int = 10, seed: int = 0,
               per_line: bool = False) -> onnx.ModelProto:
    """A CRNN-like recogniser without the RNN: two Convs over an N x 3 x 8 x 32 line image,
    averaged over the height, transposed to N x T x 16 (T = 32 columns) and projected to
    ``classes`` per time step (``per_line``: averaged over time, N x 1 x C), then Softmax over
    ``softmax_axis`` (None: no Softmax)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.3, n) for n, s in
             [("w1", (32, 3, 3, 3)), ("b1", (32,)), ("w2", (32, 32, 3, 3)), ("b2", (32,)), ("proj", (32, classes))]]
    inits.append(numpy_helper.from_array(np.array([2], np.int64), "h_axis"))
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("ReduceMean", ["r2", "h_axis"], ["pooled"], keepdims=0) if opset >= 18 else
        helper.make_node("ReduceMean", ["r2"], ["pooled"], axes=[2], keepdims=0),
        helper.make_node("Transpose", ["pooled"], ["seq"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["seq", "proj"], ["steps"]),
    ]
    if per_line:
        nodes.append(helper.make_node("ReduceMean", ["steps"], ["scores"], axes=[1], keepdims=1))
    else:
        nodes.append(helper.make_node("Identity", ["steps"], ["scores"]))
    if opset < 18:
        inits = [i for i in inits if i.name != "h_axis"]
    nodes.append(helper.make_node("Softmax", ["scores"], ["out"], axis=softmax_axis) if softmax_axis is not None
                 else helper.make_node("Identity", ["scores"], ["out"]))
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 1 if per_line else 32, classes])
    image = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 32])
    graph = helper.make_graph(nodes, "recogniser", [image], [out], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def images(n=64, seed=1):
    return np.random.default_rng(seed).standard_normal((n, 3, 8, 32)).astype(np.float32)


def test_rules_for_the_class_axis():
    plain = OutputKind()
    assert class_axis(plain, (4, 10)) == 1
    assert class_axis(plain, (4, 10, 1, 1)) == 1 and class_axis(plain, (4, 1, 10)) == 2
    assert class_axis(plain, (4, 21, 16, 16)) == 1  # per-pixel classes (segmentation layout)
    assert class_axis(plain, (4, 32, 10)) is None  # N x T x C and N x C x L look alike: not guessed
    assert class_axis(plain, (4, 1, 16, 16)) is None and class_axis(plain, (4, 1)) is None
    assert class_axis(plain, (4,)) is None
    assert class_axis(OutputKind(2, True), (4, 32, 10)) == 2
    assert class_axis(OutputKind(-1, True), (4, 32, 10)) == 2
    # opset < 13: Softmax normalised over every axis from `axis` on, a class axis only if the rest is 1
    assert class_axis(OutputKind(1, True, coerced=True), (4, 32, 10)) is None
    assert class_axis(OutputKind(1, True, coerced=True), (4, 10, 1, 1)) == 1
    assert class_axis(OutputKind(2, True, coerced=True), (4, 32, 10)) == 2


def test_the_graph_tells_the_softmax_axis_and_its_default_per_opset():
    assert output_kind(recogniser(2), "out") == OutputKind(2, True, False)
    assert output_kind(recogniser(None), "out") == OutputKind()
    model = recogniser(2)
    model.graph.node[-1].ClearField("attribute")  # default axis: -1 from opset 13, 1 before
    assert output_kind(model, "out").softmax_axis == -1
    old = recogniser(2, opset=11)
    old.graph.node[-1].ClearField("attribute")
    assert output_kind(old, "out") == OutputKind(1, True, True)


def test_a_recogniser_is_compared_per_time_step_over_its_classes():
    model = recogniser(2)
    x = images(8)
    reference = run(model, {"input": x})[0]  # N x T x C probabilities
    changed = reference.copy()
    changed[0, 5] = changed[0, 5][::-1]  # one time step of one line reads another character
    kind = output_kind(model, "out")
    stats = compare_first_output(as_logits(reference, kind), as_logits(changed, kind))
    flips = (reference.argmax(2) != changed.argmax(2)).sum()
    assert flips == 1
    assert stats["top1_agreement"] == pytest.approx(1 - 1 / (8 * 32))
    # the KL is the probabilities' own: sum p log(p / q), averaged over lines and time steps
    p, q = reference.astype(np.float64), changed.astype(np.float64)
    expected = (p * (np.log(p) - np.log(q))).sum(2).mean()
    assert stats["mean_kl"] == pytest.approx(expected, rel=1e-6)
    # what the old reading (axis 1, the time steps, as logits) would have said differs
    assert compare_first_output(reference.astype(np.float64), changed.astype(np.float64))["mean_kl"] \
        != pytest.approx(expected, rel=1e-3)


def test_an_output_without_class_scores_is_compared_by_relative_error_only():
    model = recogniser(None)
    out = first_output(model, {"input": images(8)}, 4)
    stats = compare_first_output(out, out * 1.1)
    assert stats["top1_agreement"] is None and stats["mean_kl"] is None
    assert stats["rel_mse"] == pytest.approx(0.01)


def test_eval_reads_softmax_outputs_as_log_probabilities_and_refuses_a_sequence():
    x = images(6)
    classifier = recogniser(1)  # softmax over time: N x T x C, but the class axis is T here
    with pytest.raises(UserError, match="one row per image"):
        predict_logits(classifier, x)
    per_line = recogniser(2, per_line=True)  # N x 1 x C probabilities
    logits = predict_logits(per_line, x)
    probabilities = run(per_line, {"input": x})[0].reshape(6, -1)
    assert logits.shape == (6, 10)
    np.testing.assert_allclose(logits, np.log(probabilities), rtol=1e-5, atol=1e-6)


def test_calibration_measures_a_recogniser_per_time_step():
    """End to end: the fidelity calibration reports is the per-time-step agreement of the written
    model with the input on the held-out inputs (the last eighth of the data)."""
    model = recogniser(2)
    data = images(64)
    pruned, report = prune(model, PruneConfig(calib={"input": data}, rate=0.5, groups=1))
    stats = report["calibration"]["fidelity"]["calibrated"]
    held = data[-8:]
    dense, out = run(model, {"input": held})[0], run(pruned, {"input": held})[0]
    assert stats["top1_agreement"] == pytest.approx(float((dense.argmax(2) == out.argmax(2)).mean()))
    p, q = dense.astype(np.float64), out.astype(np.float64)
    assert stats["mean_kl"] == pytest.approx((p * (np.log(p) - np.log(q))).sum(2).mean(), rel=1e-3, abs=1e-7)


def _perturbed(model: onnx.ModelProto, scale=0.3, seed=3) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    out = onnx.ModelProto.FromString(model.SerializeToString())
    for init in out.graph.initializer:
        if init.name in ("w1", "w2"):
            w = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array((w * (1 + scale * rng.standard_normal(w.shape))).astype(np.float32),
                                                  init.name))
    return out


def test_distillation_trains_a_recogniser_on_the_kl_of_its_probabilities():
    pytest.importorskip("torch")
    from onnxprune.distillation.distill import distill

    teacher = recogniser(2)
    student = _perturbed(teacher)
    data = images(40, seed=4)
    _, report = distill(student, teacher, data, steps=15, lr=3e-3, batch_size=16, seed=5, threads=1, zoom=(1.0, 1.0))
    assert report["loss_used"] == "kl"
    before = report["holdout"]["before"]
    # the reported KL is the probabilities' own, over C at every time step (not over time)
    hold = np.sort(np.random.default_rng(5).permutation(40)[:8])
    p = run(teacher, {"input": data[hold]})[0].astype(np.float64)
    q = run(student, {"input": data[hold]})[0].astype(np.float64)
    assert before["kl"] == pytest.approx((p * (np.log(p) - np.log(q))).sum(2).mean(), rel=1e-4)
    assert before["top1_agreement"] == pytest.approx((p.argmax(2) == q.argmax(2)).mean(), abs=1e-4)
    assert report["train"]["after"]["kl"] < 0.8 * report["train"]["before"]["kl"]


def test_distillation_of_a_map_without_classes_trains_on_its_relative_error():
    """A KL over a detector map's singleton channel axis is 0: it trained nothing, and the report
    said 100% agreement. The loss is the relative squared error, reported as such."""
    pytest.importorskip("torch")
    from onnxprune.distillation.distill import distill

    teacher = recogniser(None)
    teacher.graph.node[-1].CopyFrom(helper.make_node("Sigmoid", ["scores"], ["out"]))
    student = _perturbed(teacher)
    data = images(40, seed=4)
    _, report = distill(student, teacher, data, steps=15, lr=3e-3, batch_size=16, seed=5, threads=1, zoom=(1.0, 1.0))
    assert report["loss_used"] == "rel_mse"
    before, after = report["train"]["before"], report["train"]["after"]
    assert before["top1_agreement"] is None and before["kl"] is None
    assert after["rel_mse"] < 0.8 * before["rel_mse"]
    assert report["improved"] is not None


def test_log_softmax_casts_and_old_softmax_defaults_are_read():
    model = recogniser(2)
    model.graph.node[-1].op_type = "LogSoftmax"
    assert output_kind(model, "out") == OutputKind(2, False, False)  # log-probabilities: logits already
    model = recogniser(2)
    model.graph.node[-1].output[0] = "probs"
    model.graph.node.append(helper.make_node("Cast", ["probs"], ["out"], to=TensorProto.FLOAT))
    assert output_kind(model, "out") == OutputKind(2, True, False)
    model.graph.node[-1].attribute[0].i = TensorProto.INT64  # a Cast to integers is not the scores any more
    assert output_kind(model, "out") == OutputKind()
    # opset 11, default axis 1 over N x 1 x C: normalised over 1 x C as one, so C holds the classes
    old = recogniser(2, opset=11, per_line=True)
    old.graph.node[-1].ClearField("attribute")
    assert class_axis(output_kind(old, "out"), (4, 1, 10)) == 2
    logits = predict_logits(old, images(4))
    np.testing.assert_allclose(logits, np.log(run(old, {"input": images(4)})[0].reshape(4, -1)), rtol=1e-5, atol=1e-6)


def test_an_fp16_model_is_read_through_the_converters_casts():
    from onnxprune.rewriting.precision import to_fp16

    model = recogniser(2)
    half, _ = to_fp16(model)
    assert output_kind(half, "out") == output_kind(model, "out")
    x = {"input": images(8)}
    stats = compare_first_output(first_output(model, x, 8), first_output(half, x, 8))
    assert stats["top1_agreement"] > 0.95 and stats["mean_kl"] < 1e-3


@pytest.mark.parametrize("per_line", [False, True])
def test_the_sensitivity_planner_compares_like_with_like(per_line):
    """The measured cost of a layer at its full width is ~0, and a narrower width costs what a
    manual cut of the same refit weights costs (the reference and the probe read alike)."""
    from onnxprune.planning.sensitivity import measure

    model = recogniser(2, per_line=per_line)
    report = measure(model, {"input": images(256, seed=7)}, {"conv2": [8, 16, 32]})
    layer = report.layers["conv2"]
    assert layer.cost[-1] < 1e-6
    assert 0 < layer.cost[0] < 5 and layer.cost[0] >= layer.cost[1]


def test_distillation_loss_is_the_kl_over_classes_at_every_time_step():
    torch = pytest.importorskip("torch")
    from onnxprune.distillation.distill_metrics import distill_loss

    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(10), size=(4, 32)).astype(np.float32)  # N x T x C probabilities
    q = rng.dirichlet(np.ones(10), size=(4, 32)).astype(np.float32)
    kind = OutputKind(2, True, False)
    value = float(distill_loss(torch.from_numpy(q), torch.from_numpy(p), "kl", 1.0, kind))
    expected = (p * (np.log(p) - np.log(q))).sum(2).mean()
    assert value == pytest.approx(expected, rel=1e-4)
    logits = OutputKind(-1, False, False)  # LogSoftmax output: log-probabilities taken as they are
    value = float(distill_loss(torch.from_numpy(np.log(q)), torch.from_numpy(np.log(p)), "kl", 1.0, logits))
    assert value == pytest.approx(expected, rel=1e-4)
