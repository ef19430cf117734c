"""grouped_forms: every form of a grouped-kernel layer computes exactly what Gather + Conv(group=G) did."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.pipeline import PruneConfig, prune
from onnxprune.rewriting.grouped_forms import FORMS, grouped_convs, to_form

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def _grouped_model(indices, groups=4, k=3, c_in=10, c_out=8, kernel=1, bias=True, opset=17, extra_reader=False,
                   hw=(6, 6), depthwise_too=False):
    """x[N, c_in, H, W] -> Gather(indices) -> Conv(group=groups) -> y (and optional extra nodes)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.asarray(indices, np.int64), "idx"),
             numpy_helper.from_array(rng.standard_normal((c_out, k, kernel, kernel)).astype(np.float32), "w")]
    conv_in = ["g", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(c_out).astype(np.float32), "b"))
        conv_in.append("b")
    pad = kernel // 2
    nodes = [helper.make_node("Gather", ["x", "idx"], ["g"], name="gather", axis=1),
             helper.make_node("Conv", conv_in, ["y"], name="conv", group=groups, kernel_shape=[kernel, kernel],
                              pads=[pad] * 4)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c_out, *hw])]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["g"], ["r"], name="relu"))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", groups * k, *hw]))
    if depthwise_too:
        inits.append(numpy_helper.from_array(rng.standard_normal((c_out, 1, 3, 3)).astype(np.float32), "dw"))
        nodes.append(helper.make_node("Conv", ["y", "dw"], ["z"], name="depthwise", group=c_out, pads=[1] * 4))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", c_out, *hw]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c_in, *hw])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], outputs, inits),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _run(model, hw=(6, 6), c_in=10):
    x = np.random.default_rng(1).standard_normal((2, c_in, *hw)).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def _assert_same(a, b):
    for u, v in zip(a, b):
        assert np.abs(u - v).max() <= 1e-4 * max(1.0, np.abs(u).max())


# four groups of three channels each, reading overlapping subsets of ten (channel 9 never read)
OVERLAPPING = [0, 1, 2, 2, 3, 4, 4, 5, 0, 6, 7, 8]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_every_form_equals_the_grouped_layer(form, kernel, bias):
    model = _grouped_model(OVERLAPPING, kernel=kernel, bias=bias)
    out, report = to_form(model, form)
    onnx.checker.check_model(out)
    _assert_same(_run(model), _run(out))
    expect_change = form in ("split", "union") or (form == "matmul" and kernel == 1)
    assert report["changed"] == (["conv"] if expect_change else [])
    if form == "matmul" and kernel == 3:
        assert report["kept"] == {"conv": "not a 1x1, stride-1, unpadded Conv"}


def test_union_reads_only_the_channels_some_group_reads():
    out, _ = to_form(_grouped_model(OVERLAPPING), "union")
    gathers = [n for n in out.graph.node if n.op_type == "Gather"]
    assert len(gathers) == 1 and gathers[0].input[0] == "x"  # the old Gather folded into a new one
    union = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == gathers[0].input[1]))
    assert union.tolist() == list(range(9))  # sorted; channel 9 is read by no group
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    weight = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == conv.input[1]))
    assert weight.shape == (8, 9, 1, 1)
    assert not any(a.name == "group" for a in conv.attribute)


def test_union_over_every_channel_in_order_needs_no_gather():
    indices = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]  # the union is all ten channels
    out, _ = to_form(_grouped_model(indices), "union")
    assert [n.op_type for n in out.graph.node] == ["Conv"]
    assert out.graph.node[0].input[0] == "x"
    _assert_same(_run(_grouped_model(indices)), _run(out))


def test_a_gather_with_another_reader_stays():
    model = _grouped_model(OVERLAPPING, extra_reader=True)
    out, _ = to_form(model, "union")
    assert any(n.name == "gather" for n in out.graph.node)
    _assert_same(_run(model), _run(out))


def test_depthwise_convs_are_left_alone():
    model = _grouped_model(OVERLAPPING, depthwise_too=True)
    assert grouped_convs(model) == ["conv"]
    for form in FORMS:
        out, report = to_form(model, form)
        assert "depthwise" not in report["changed"]
        assert any(n.name == "depthwise" for n in out.graph.node)
        _assert_same(_run(model), _run(out))


def test_matmul_needs_static_height_and_width():
    model = _grouped_model(OVERLAPPING, hw=("H", "W"))
    out, report = to_form(model, "matmul")
    assert report["kept"] == {"conv": "output H and W not static"}
    assert report["changed"] == []


def test_split_before_opset_13_uses_the_attribute():
    model = _grouped_model(OVERLAPPING, opset=11)
    out, _ = to_form(model, "split")
    split = next(n for n in out.graph.node if n.op_type == "Split")
    assert len(split.input) == 1 and any(a.name == "split" for a in split.attribute)
    _assert_same(_run(model), _run(out))


@pytest.mark.parametrize("form", FORMS)
def test_forms_are_deterministic(form):
    model = _grouped_model(OVERLAPPING)
    assert to_form(model, form)[0].SerializeToString() == to_form(model, form)[0].SerializeToString()


def test_unknown_form_is_refused():
    with pytest.raises(ValueError, match="unknown grouped-layer form"):
        to_form(_grouped_model(OVERLAPPING), "winograd")


def test_forms_of_a_real_g8_rewrite():
    """The paper's layer as onnxprune emits it (ResNet-20 sample, --groups 8): every form equal."""
    model, _ = prune(str(SAMPLES / "resnet20.onnx"), PruneConfig(groups=8, rate=0.4375, verify=False))
    assert grouped_convs(model)
    x = np.random.default_rng(2).standard_normal((2, 1, 28, 28)).astype(np.float32)

    def run(m):
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {sess.get_inputs()[0].name: x})[0]

    ref = run(model)
    for form in FORMS:
        out, report = to_form(model, form)
        assert np.abs(run(out) - ref).max() <= 1e-4 * np.abs(ref).max(), form
        if form in ("split", "union"):
            assert sorted(report["changed"]) == sorted(grouped_convs(model))


def test_an_unnamed_gather_is_folded_without_touching_other_unnamed_nodes():
    model = _grouped_model(OVERLAPPING)
    for node in model.graph.node:
        node.name = ""
    model.graph.node.append(helper.make_node("Relu", ["y"], ["yr"]))
    model.graph.output.append(helper.make_tensor_value_info("yr", TensorProto.FLOAT, ["N", 8, 6, 6]))
    out, _ = to_form(model, "union")
    onnx.checker.check_model(out)
    assert [n.op_type for n in out.graph.node] == ["Gather", "Conv", "Relu"]
    _assert_same(_run(model), _run(out))


def test_a_grouped_conv_with_a_computed_weight_is_kept_and_said():
    model = _grouped_model(OVERLAPPING)
    w = next(t for t in model.graph.initializer if t.name == "w")
    model.graph.node.insert(0, helper.make_node("Identity", ["w"], ["w_id"], name="w_identity"))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    conv.input[1] = "w_id"
    assert w is not None
    out, report = to_form(model, "split")
    assert report["kept"] == {"conv": "weight is not a constant initializer"} and report["changed"] == []
    _assert_same(_run(model), _run(out))


def test_provider_cuda_emits_the_union_form_and_verifies_it():
    """--groups 8 --provider cuda: no grouped Conv left (cuDNN's are slow), still equal to the masked model."""
    cuda, report = prune(str(SAMPLES / "resnet20.onnx"), PruneConfig(groups=8, rate=0.4375, provider="cuda"))
    cpu, _ = prune(str(SAMPLES / "resnet20.onnx"), PruneConfig(groups=8, rate=0.4375, verify=False))
    assert grouped_convs(cuda) == [] and len(grouped_convs(cpu)) == 20
    assert report.data["verify"]["passed"]
    assert "20 grouped Convs in union form" in next(p.value for p in cuda.metadata_props if p.key == "onnxprune")
