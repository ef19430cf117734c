"""Issue 12: verification judged a saturated output (a Sigmoid map near 1e-4) at its own tiny
maximum, so float rounding in logits agreeing to 1e-6 failed it; outputs of bounded activations
are now judged at the scale of their range (verify.output_floors). Then a Softmax over logits near
1000 (PP-OCRv4 rec pruned without data): rounding in the logits moved its probabilities by
2.8e-4; such outputs are floored at L * max|logits| too, and the logits themselves are judged, so
an error the floors would hide still fails (verify.bounded_outputs)."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.planning.plan import Plan
from onnxprune.checks.verify import bounded_outputs, compare_outputs, output_floors, random_inputs, session, verify


def _saturated(shift=0.0, head="Sigmoid"):
    """y = head(-9 - 80|x| + shift), reshaped: logits in about [-300, -9], so a Sigmoid output is
    at most ~1.2e-4. ``shift`` models the rounding of a rewritten model (2.4e-4: 1e-6 of the
    logits' scale) or a real error."""
    inits = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in
             (("slope", -80.0), ("offset", -9.0 + shift))]
    inits.append(numpy_helper.from_array(np.array([0, -1], np.int64), "flat"))
    nodes = [helper.make_node("Abs", ["x"], ["ax"]), helper.make_node("Mul", ["ax", "slope"], ["m"]),
             helper.make_node("Add", ["m", "offset"], ["z"])]
    if head:
        nodes.append(helper.make_node(head, ["z"], ["s"]))
    nodes.append(helper.make_node("Reshape", ["s" if head else "z", "flat"], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 256])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)


def _outputs(model):
    return session(model).run(None, random_inputs(_saturated(), seed=0))


def test_saturated_sigmoid_output_with_agreeing_logits_passes():
    reference, rewritten = _saturated(), _saturated(shift=2.4e-4)
    # the logits agree to ~1e-6 of their scale ...
    _, logits_rel = compare_outputs(_outputs(_saturated(head=None)), _outputs(_saturated(2.4e-4, head=None)))
    assert logits_rel < 2e-6
    # ... which the old rule (relative to max|a| alone) called a 1e-4-scale failure
    _, old_rel = compare_outputs(_outputs(reference), _outputs(rewritten))
    assert old_rel > 1e-4
    result = verify(reference, rewritten, Plan(layers=[]))
    assert result.passed and result.max_rel_diff < 1e-6


@pytest.mark.parametrize("head", ["Sigmoid", None])
def test_a_real_error_still_fails(head):
    result = verify(_saturated(head=head), _saturated(shift=3.0, head=head), Plan(layers=[]))
    assert not result.passed


def _floors_of(nodes, inits=()):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 2, 2])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "z")],
                              list(inits))
    return output_floors(helper.make_model(graph))


def test_output_floors_follow_layout_ops_to_bounded_activations():
    limits = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("lo", 0.0), ("hi", 6.0))]
    floors = _floors_of([helper.make_node("Sigmoid", ["x"], ["s"]),
                         helper.make_node("Transpose", ["s"], ["t"], perm=[0, 2, 3, 1]),
                         helper.make_node("Flatten", ["t"], ["y"]),
                         helper.make_node("Clip", ["x", "lo", "hi"], ["z"])], limits)
    assert floors == [1.0, 6.0]
    floors = _floors_of([helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Relu", ["x"], ["r"]),
                         helper.make_node("Concat", ["s", "r"], ["y"], axis=1),
                         helper.make_node("Mul", ["s", "s"], ["z"])])
    assert floors == [0.0, 0.0]  # unbounded part, or an op that changes values


def test_a_floor_raises_the_scale_only_where_given():
    a, b = [np.full(3, 1e-4)], [np.full(3, 1e-4 + 2.4e-8)]
    assert compare_outputs(a, b)[1] == pytest.approx(2.4e-4)
    assert compare_outputs(a, b, [1.0])[1] == pytest.approx(2.4e-8)


def test_a_real_error_hidden_by_the_floor_is_seen_in_the_logits():
    """A shift of 0.05 in logits of scale 300 (1.7e-4 of it) moves the saturated Sigmoid output by
    ~6e-6 of its range: the floor alone passed it; the logits are judged too."""
    reference, wrong = _saturated(), _saturated(shift=0.05)
    assert compare_outputs(_outputs(reference), _outputs(wrong), output_floors(reference))[1] < 1e-4
    result = verify(reference, wrong, Plan(layers=[]))
    assert not result.passed and result.max_rel_diff > 1e-4


def _softmax(noise=0.0, permuted=False):
    """softmax(x @ w + 1000 + noise) over 8 classes, the logits a few units apart (so the
    probabilities are not one-hot) at a scale of 1000; ``noise``: added to the logits with
    alternating signs (2e-3 is 2e-6 of their scale, float rounding's size); ``permuted``: the
    classes computed in another order and put back by a Gather after the Softmax, as a rewrite
    with permuted filters does."""
    order = np.array([3, 0, 6, 1, 7, 2, 5, 4]) if permuted else np.arange(8)
    weight = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    bias = (1000.0 + noise * np.array([1, -1] * 4)).astype(np.float32)
    inits = [numpy_helper.from_array(weight[:, order], "w"), numpy_helper.from_array(bias[order], "b"),
             numpy_helper.from_array(np.argsort(order).astype(np.int64), "back")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["z"]),
             helper.make_node("Softmax", ["z"], ["p"], axis=-1),
             helper.make_node("Gather", ["p", "back"], ["y"], axis=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)


def test_softmax_over_large_logits_is_judged_at_their_scale():
    reference = _softmax()
    assert bounded_outputs(reference)[0].floor == 1.0 and bounded_outputs(reference)[0].sources == (("p", 0.5),)
    rounded = _softmax(noise=2e-3)
    feeds = random_inputs(reference, seed=0)
    expected, got = (session(m).run(None, feeds) for m in (reference, rounded))
    assert compare_outputs(expected, got, output_floors(reference))[1] > 1e-4  # the range floor alone fails it
    result = verify(reference, rounded, Plan(layers=[]))
    assert result.passed and result.max_rel_diff < 1e-5
    assert verify(reference, _softmax(permuted=True), Plan(layers=[])).passed  # logits held in another order
    assert not verify(reference, _softmax(noise=1.0), Plan(layers=[])).passed  # 1e-3 of the logits' scale
