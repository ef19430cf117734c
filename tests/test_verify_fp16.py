"""fp16 models and the exactness oracle (verify.py) and the fp16 check (late_stages.fp16_stage).

Faults these pin: re-pruning an fp16 output of ``--precision fp16`` failed verification (PP-OCRv5
det: 0.138, a Sigmoid map saturated near 6e-7 behind the converter's output Cast, judged at its
own maximum; PP-OCRv4 rec: 6.1e-4, fp16 graphs rounded at different places by ONNX Runtime), and
``--precision fp16`` failed on PP-OCRv4 rec with nothing pruned (1.05e-2: the rounding of its
weights alone, judged as if it were a conversion error). Each fix is shown to still fail a wrong
rewrite or conversion."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphs import GraphBuilder
from onnxprune.checks.verify import compare_models, masked_model, output_floors, verify
from onnxprune.errors import PassFailed
from onnxprune.late_stages import FP16_TOLERANCE
from onnxprune.pipeline import PruneConfig, prune
from onnxprune.planning.plan import Plan
from onnxprune.rewriting import precision

CONFIG = dict(groups=4, rate=0.5, min_channels=8)


def convs(head=None, size=16):
    """Three 3x3 Convs of 32 channels, then 8 maps; ``head``: what the output is made of."""
    b = GraphBuilder(size=size)
    x = b.relu(b.conv("input", 32))
    x = b.relu(b.conv(x, 32))
    x = b.relu(b.conv(x, 32))
    y = b.conv(x, 8)
    if head == "saturated":  # a Sigmoid far in its tail, as a detector's map on random inputs
        y = b._op("Sigmoid", [b._op("Add", [y, b._const("offset", np.full((8, 1, 1), -14.0, np.float32))])])
    elif head == "cancelling":  # an offset computed from two weights fp16 cannot tell apart
        b.shape["big"] = b.shape["less"] = (8, 1, 1)
        offset = b._op("Sub", [b._const("big", np.full((8, 1, 1), 1000.1, np.float32)),
                               b._const("less", np.full((8, 1, 1), 1000.0, np.float32))])
        y = b._op("Add", [y, offset])
    b.output(y)
    return b.model()


@pytest.mark.parametrize("head", [None, "saturated"])
def test_an_fp16_model_pruned_again_is_verified(head):
    half, _ = precision.to_fp16(convs(head))
    pruned, report = prune(half, PruneConfig(**CONFIG))
    assert report["convs_pruned"] > 0 and report["verify"]["passed"]
    assert report["verify"]["max_rel_diff"] < 1e-5
    assert any(t.data_type == TensorProto.FLOAT16 for t in pruned.graph.initializer)  # still an fp16 model


def test_a_saturated_output_is_judged_at_its_range_behind_the_converters_cast():
    half, _ = precision.to_fp16(convs("saturated"))
    assert half.graph.node[-1].op_type == "Cast"  # the converter's, before the fp32 graph output
    assert output_floors(half) == [1.0]


def test_a_wrong_rewrite_of_an_fp16_model_still_fails():
    """(An unsaturated head: behind a Sigmoid saturated near 1e-6 a 5% weight error moves the
    output by less than 1e-4 of its range, which verification does not see, fp16 or not; see
    verify.py's rules.)"""
    half, _ = precision.to_fp16(convs())
    captured = {}

    def spy(normalized, rewritten, plan, **kw):
        captured.update(normalized=normalized, rewritten=rewritten, plan=plan)
        return verify(normalized, rewritten, plan, **kw)

    with pytest.MonkeyPatch.context() as patch:
        import onnxprune.pipeline as pipeline

        patch.setattr(pipeline, "verify", spy)
        prune(half, PruneConfig(**CONFIG))
    wrong = onnx.ModelProto()
    wrong.CopyFrom(captured["rewritten"])
    weight = next(t for t in wrong.graph.initializer if t.data_type == TensorProto.FLOAT16 and len(t.dims) == 4)
    value = numpy_helper.to_array(weight).copy()
    value.flat[0] += np.float16(0.05) * np.abs(value).max()  # one kernel weight off by 5% of the largest
    weight.CopyFrom(numpy_helper.from_array(value, weight.name))
    result = verify(captured["normalized"], wrong, captured["plan"])
    assert not result.passed and result.max_rel_diff > 1e-3


def _rounded_between(rounds: bool, scale: float = 1.0, broken: bool = False) -> onnx.ModelProto:
    """x -> MatMul by an fp16 weight -> MatMul by another -> y, computed in fp32 on fp32 copies of
    the weights (Casts), as ORT's CPU provider computes an fp16 graph; ``rounds``: the tensor
    between the MatMuls goes through fp16 and back (where ORT rounds in one graph and not the
    other: an op with an fp16 kernel, such as the rewrite's Gather); ``scale``: the first weight
    scaled (a wrong rewrite); ``broken``: an fp16 zero bias added to the fp32 output (types that
    do not hold together, which an fp32 copy would not show)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((16, 16)) * s).astype(np.float16), n)
             for n, s in (("w1", scale), ("w2", 1.0))]
    nodes = [helper.make_node("Cast", [w], [f"{w}_32"], to=TensorProto.FLOAT) for w in ("w1", "w2")]
    nodes.append(helper.make_node("MatMul", ["x", "w1_32"], ["h"]))
    if rounds:
        nodes += [helper.make_node("Cast", ["h"], ["h16"], to=TensorProto.FLOAT16),
                  helper.make_node("Cast", ["h16"], ["h32"], to=TensorProto.FLOAT)]
    nodes.append(helper.make_node("MatMul", ["h32" if rounds else "h", "w2_32"], ["y0" if broken else "y"]))
    if broken:
        inits.append(numpy_helper.from_array(np.zeros(16, np.float16), "b"))
        nodes.append(helper.make_node("Add", ["y0", "b"], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_fp16_graphs_are_compared_through_their_fp32_copies():
    reference, rounded = _rounded_between(False), _rounded_between(True)
    widened = precision.as_fp32(rounded)
    assert {t.data_type for t in widened.graph.initializer} == {TensorProto.FLOAT}
    assert precision.as_fp32(widened) is None  # nothing fp16 left
    # as they are, the two differ where fp16 rounded one of them ...
    assert compare_models(reference, rounded, 1e-4).max_rel_diff > 1e-4
    # ... while they compute the same: the oracle compares their fp32 copies
    result = verify(reference, rounded, Plan(layers=[]))
    assert result.passed and result.max_rel_diff < 1e-6
    assert not verify(reference, _rounded_between(True, scale=1.01), Plan(layers=[])).passed


def test_a_rewritten_fp16_model_whose_types_break_is_not_passed_by_its_fp32_copy():
    reference, broken = _rounded_between(False), _rounded_between(False, broken=True)
    assert compare_models(precision.as_fp32(reference), precision.as_fp32(broken), 1e-4).passed
    with pytest.raises(Exception, match="(?i)type"):  # ORT's own load error: a bug of ours, not the input's
        verify(reference, broken, Plan(layers=[]))


def test_the_fp16_check_judges_the_conversion_and_reports_the_weight_rounding():
    """Rounding 1000.1 and 1000 to fp16 makes their difference 0 instead of 0.1: the fp16 model
    differs from the fp32 one by ~4e-2 of its scale through its weights alone. The check compares
    it with the masked fp32 model holding the same fp16-rounded weights (passes) and reports the
    rounding's own effect."""
    model = convs("cancelling")
    _, report = prune(model, PruneConfig(**CONFIG, precision="fp16"))
    section = report["precision"]
    assert section["passed"] and section["max_rel_diff"] < 1e-4
    assert section["weight_rounding_rel_diff"] > 2e-2 > FP16_TOLERANCE
    assert section["reference"] == "the masked fp32 model with fp16-rounded weights"


def test_fp16_rounded_is_independent_of_the_converter_so_a_wrong_conversion_still_fails():
    model = convs("cancelling")
    half, _ = precision.to_fp16(model)
    rounded, clamped = precision.fp16_rounded(model, half)
    assert clamped == []
    assert {t.data_type for t in rounded.graph.initializer} == {TensorProto.FLOAT}
    assert compare_models(rounded, half, FP16_TOLERANCE).passed
    assert not compare_models(model, half, FP16_TOLERANCE).passed  # what the check judged before
    wrong = onnx.ModelProto()
    wrong.CopyFrom(half)
    weight = next(t for t in wrong.graph.initializer if len(t.dims) == 4)
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float16(1.05), weight.name))
    assert not compare_models(rounded, wrong, FP16_TOLERANCE).passed
    big, _ = precision.fp16_rounded(masked_model(model, Plan(layers=[])), half)
    assert numpy_helper.to_array(next(t for t in big.graph.initializer if t.name == "big")).flat[0] == 1000.0


def test_a_rewrite_of_an_fp32_model_through_fp16_is_not_widened_away():
    """Only an fp16 *input* is compared through fp32 copies: a rewrite of an fp32 model that
    (wrongly) rounds a tensor through fp16 keeps its rounding and fails."""
    rng = np.random.default_rng(0)
    w1, w2 = (numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), n) for n in ("w1", "w2"))

    def chain(through_fp16: bool) -> onnx.ModelProto:
        nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"])]
        if through_fp16:
            nodes += [helper.make_node("Cast", ["h"], ["h16"], to=TensorProto.FLOAT16),
                      helper.make_node("Cast", ["h16"], ["h32"], to=TensorProto.FLOAT)]
        nodes.append(helper.make_node("MatMul", ["h32" if through_fp16 else "h", "w2"], ["y"]))
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])], [w1, w2])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)

    assert precision.as_fp32(chain(True)) is not None  # its fp32 copy would hide the rounding
    result = verify(chain(False), chain(True), Plan(layers=[]))
    assert not result.passed and result.max_rel_diff > 1e-4


def _resized(scale: float, weights: float = 1.0) -> onnx.ModelProto:
    """Convs around a linear Resize by ``scale`` (a 10 x 10 map; the converter keeps the scales in
    fp32); ``weights``: a Mul by it and one by its inverse in the middle (a folded scale pair)."""
    b = GraphBuilder(size=10)
    x = b.relu(b.conv("input", 32))
    x = b.relu(b.conv(x, 32))
    if weights != 1.0:
        x = b._op("Mul", [x, b._const("up", np.full((32, 1, 1), weights, np.float32))])
        x = b._op("Mul", [x, b._const("down", np.full((32, 1, 1), 1.0 / weights, np.float32))])
    roi = b._const("roi", np.zeros(0, np.float32))
    scales = b._const("scales", np.array([1, 1, scale, scale], np.float32))
    x = b._op("Resize", [x, roi, scales], mode="linear")
    b.shape[x] = (32, int(10 * scale), int(10 * scale))
    b.output(b.conv(b.relu(b.conv(x, 32)), 8))
    return b.model()


def test_what_the_converter_keeps_in_fp32_is_not_rounded():
    """A Resize scale of 1.1 is 1.0996 in fp16: rounded, the reference's map was 10 wide where the
    fp16 model's is 11, and a valid conversion failed (by inf)."""
    model = _resized(1.1)
    half, _ = precision.to_fp16(model)
    rounded, _ = precision.fp16_rounded(model, half)
    assert numpy_helper.to_array(next(t for t in rounded.graph.initializer if t.name == "scales"))[2] == np.float32(1.1)
    _, report = prune(model, PruneConfig(**CONFIG, precision="fp16"))
    assert report["precision"]["passed"] and report["precision"]["max_rel_diff"] < 1e-2


def test_weights_beyond_the_fp16_range_fail_the_conversion():
    """1e5 clamps to 65504 in fp16 (both in the converter and in the rounded reference, so the
    comparison alone could not see it): the fp16 model is a third off, and says why."""
    with pytest.raises(PassFailed, match="up holds values beyond float16's range"):
        prune(_resized(2.0, weights=1e5), PruneConfig(**CONFIG, precision="fp16"))
    _, report = prune(_resized(2.0, weights=100.0), PruneConfig(**CONFIG, precision="fp16"))
    assert report["precision"]["passed"] and report["precision"]["clamped_to_fp16_range"] == []
