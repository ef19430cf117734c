"""Issue 12: verification judged a saturated output (a Sigmoid map near 1e-4) at its own tiny
maximum, so float rounding in logits agreeing to 1e-6 failed it; outputs of bounded activations
are now judged at the scale of their range (verify.output_floors). A NaN where the reference has
a number (or the other way round) fails: a NaN difference compared as no difference."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.planning.plan import Plan
from onnxprune.checks.verify import compare_outputs, output_floors, random_inputs, session, verify


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



def test_values_are_judged_where_the_reference_is_finite():
    ones = [np.ones(3)]
    assert compare_outputs(ones, [np.full(3, np.nan)]) == (float("inf"), float("inf"))  # NaN passed as no difference
    assert compare_outputs(ones, [np.array([1.0, np.inf, 1.0])])[1] == float("inf")
    # the masked reference's 0 * inf is NaN where the rewrite, without that product, has a number
    assert compare_outputs([np.array([2.0, np.nan, np.inf])], [np.array([2.0 + 2e-4, 5.0, np.inf])])[1] == \
        pytest.approx(1e-4)
    assert compare_outputs([np.full(3, np.nan)], [np.full(3, np.nan)])[1] == float("inf")  # nothing to judge
