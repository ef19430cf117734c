"""Label-free distillation (onnxprune/distill.py) and the ONNX -> torch bridge it trains through."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from onnxprune.distillation import torch_bridge  # noqa: E402
from onnxprune.distillation.distill import distill, structure_problems  # noqa: E402
from onnxprune.distillation.torch_bridge import OnnxModule, UnsupportedModel, default_trainable  # noqa: E402

from oracle import run  # noqa: E402

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
# One torch thread: deterministic across machines and not slowed by OpenMP spinning on a busy CI box.


def _init(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def zoo_model(seed=0, opset=17) -> onnx.ModelProto:
    """A small CNN over every op the bridge must handle, with Gather + grouped Convs in it.

    input N x 3 x 12 x 12 -> Pad -> Sub/Div -> Conv 3->16 -> Clip (ReLU6)
    -> Gather(axis=1, 4 groups x 3 channels, permuted, repeats) -> Conv(group=4) 12->16 -> Relu
    -> Conv(group=2, no Gather) -> BatchNormalization -> Add(skip) -> Mul const
    -> MaxPool (asymmetric pads) / AveragePool -> Concat -> depthwise Conv -> Sigmoid*x
    -> ReduceMean(keepdims) + GlobalAveragePool -> Flatten -> Gemm(transB) -> Reshape -> Identity
    """
    rng = np.random.default_rng(seed)
    w = lambda *shape: rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))  # noqa: E731
    gather_idx = np.array([0, 5, 9, 1, 1, 2, 15, 14, 3, 7, 8, 4])
    inits = [
        _init("pads", [0, 0, 1, 1, 0, 0, 1, 1], np.int64), _init("pad_value", 0.0),
        _init("mean", rng.uniform(0.3, 0.6, (1, 3, 1, 1))), _init("std", rng.uniform(0.2, 0.3, (1, 3, 1, 1))),
        _init("c1.w", w(16, 3, 3, 3)), _init("c1.b", rng.standard_normal(16) * 0.1),
        _init("clip_lo", 0.0), _init("clip_hi", 6.0),
        _init("g.idx", gather_idx, np.int64),
        _init("c2.w", w(16, 3, 3, 3)), _init("c2.b", rng.standard_normal(16) * 0.1),
        _init("c3.w", w(16, 8, 3, 3)),
        _init("bn.s", rng.uniform(0.5, 1.5, 16)), _init("bn.b", rng.standard_normal(16) * 0.1),
        _init("bn.m", rng.standard_normal(16) * 0.1), _init("bn.v", rng.uniform(0.5, 1.5, 16)),
        _init("scale", rng.uniform(0.5, 1.5, (1, 16, 1, 1))),
        _init("dw.w", w(32, 1, 3, 3)), _init("dw.b", rng.standard_normal(32) * 0.1),
        _init("axes", [2, 3], np.int64),
        _init("fc.w", w(10, 32)), _init("fc.b", rng.standard_normal(10) * 0.1),
        _init("shape", [0, -1], np.int64),
    ]
    nodes = [
        helper.make_node("Pad", ["input", "pads", "pad_value"], ["p"], mode="constant"),
        helper.make_node("Sub", ["p", "mean"], ["s"]),
        helper.make_node("Div", ["s", "std"], ["d"]),
        helper.make_node("Conv", ["d", "c1.w", "c1.b"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c1", "clip_lo", "clip_hi"], ["r1"]),
        helper.make_node("Gather", ["r1", "g.idx"], ["g"], axis=1),
        helper.make_node("Conv", ["g", "c2.w", "c2.b"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=4),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "c3.w"], ["c3"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=2),
        helper.make_node("BatchNormalization", ["c3", "bn.s", "bn.b", "bn.m", "bn.v"], ["bn"], epsilon=1e-5),
        helper.make_node("Add", ["bn", "r1"], ["a"]),
        helper.make_node("Mul", ["a", "scale"], ["m"]),
        helper.make_node("MaxPool", ["m"], ["mp"], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1]),
        helper.make_node("AveragePool", ["m"], ["ap"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Concat", ["mp", "ap"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "dw.w", "dw.b"], ["dw"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         group=32),
        helper.make_node("Sigmoid", ["dw"], ["sg"]),
        helper.make_node("Mul", ["dw", "sg"], ["sw"]),
        helper.make_node("ReduceMean", ["sw", "axes"], ["rm"], keepdims=1) if opset >= 18 else
        helper.make_node("ReduceMean", ["sw"], ["rm"], axes=[2, 3], keepdims=1),
        helper.make_node("GlobalAveragePool", ["sw"], ["gap"]),
        helper.make_node("Add", ["rm", "gap"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["fc"], transB=1),
        helper.make_node("Reshape", ["fc", "shape"], ["rs"]),
        helper.make_node("Identity", ["rs"], ["logits"]),
    ]
    if opset < 18:
        inits = [t for t in inits if t.name != "axes"]
    graph = helper.make_graph(nodes, "zoo", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                           ["N", 3, 12, 12])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def perturbed(model: onnx.ModelProto, seed=1, amount=0.3) -> onnx.ModelProto:
    """``model`` with noise on every Conv/Gemm weight: a student that has something to learn."""
    rng = np.random.default_rng(seed)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    names = set(default_trainable(model))
    for tensor in out.graph.initializer:
        if tensor.name in names:
            value = numpy_helper.to_array(tensor)
            noisy = value + amount * value.std() * rng.standard_normal(value.shape)
            tensor.CopyFrom(numpy_helper.from_array(noisy.astype(value.dtype), tensor.name))
    return out


def images(count=48, seed=3, shape=(3, 12, 12)):
    return np.random.default_rng(seed).integers(0, 256, (count,) + shape, dtype=np.uint8)


def bridge_outputs(model, x):
    with torch.no_grad():
        return [t.numpy() for t in OnnxModule(model)(torch.from_numpy(x))]


def rel(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-12))


@pytest.fixture(scope="module")
def resnet20_pruned():
    from onnxprune.pipeline import PruneConfig, prune

    pruned, _ = prune(str(SAMPLES / "resnet20.onnx"), PruneConfig(groups=8, rate=0.6, methods=("kpca",)))
    return pruned


# -- the torch bridge ---------------------------------------------------------------------

@pytest.mark.parametrize("opset", [13, 17, 18])
def test_bridge_matches_onnxruntime_on_every_supported_pattern(opset):
    model = zoo_model(opset=opset)
    x = np.random.default_rng(0).random((3, 3, 12, 12), dtype=np.float32)
    assert rel(run(model, {"input": x})[0], bridge_outputs(model, x)[0]) < 1e-4


def test_bridge_matches_onnxruntime_on_pruned_resnet20(resnet20_pruned):
    ops = {n.op_type for n in resnet20_pruned.graph.node}
    assert "Gather" in ops and any(a.name == "group" and a.i == 8 for n in resnet20_pruned.graph.node
                                   for a in n.attribute)
    x = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    assert rel(run(resnet20_pruned, {"input": x})[0], bridge_outputs(resnet20_pruned, x)[0]) < 1e-4


def test_parameters_are_the_conv_and_gemm_initializers_by_name():
    model = zoo_model()
    module = OnnxModule(model)
    assert module.trainable_names == ["c1.w", "c1.b", "c2.w", "c2.b", "c3.w", "dw.w", "dw.b", "fc.w", "fc.b"]
    assert {p.data_ptr() for p in module.parameters()} == {module.parameter(n).data_ptr()
                                                          for n in module.trainable_names}
    # gradients reach the grouped weight through the fused Gather + grouped Conv
    out = module(torch.rand(2, 3, 12, 12))[0]
    out.sum().backward()
    assert all(module.parameter(n).grad is not None for n in module.trainable_names)
    # writing back unchanged weights gives the same bytes
    assert module.export().SerializeToString() == model.SerializeToString()


def test_unsupported_op_is_a_clear_error():
    model = zoo_model()
    model.graph.node[-1].op_type = "Erf"
    with pytest.raises(UnsupportedModel, match="Erf"):
        OnnxModule(model)


def test_missing_torch_says_how_to_install(monkeypatch):
    monkeypatch.setattr(torch_bridge, "torch", None)
    with pytest.raises(ImportError, match=r"pip install onnxprune\[distill\]"):
        torch_bridge.require_torch()


# -- distillation -------------------------------------------------------------------------

def test_distillation_lowers_kl_keeps_structure_and_is_deterministic():
    teacher = zoo_model()
    student = perturbed(teacher)
    data = images()
    out, report = distill(student, teacher, data, steps=12, lr=3e-3, batch_size=16, seed=5, threads=1)
    again, report2 = distill(student, teacher, data, steps=12, lr=3e-3, batch_size=16, seed=5, threads=1)
    assert report["steps"] == report["steps_done"] == 12 and not report["truncated"]
    assert report["train"]["after"]["kl"] < 0.7 * report["train"]["before"]["kl"]
    assert report["holdout"]["before"]["count"] == round(0.2 * len(data))
    assert structure_problems(student, out) == []
    assert [t.name for t in out.graph.initializer] == [t.name for t in student.graph.initializer]
    changed = {t.name for t, u in zip(student.graph.initializer, out.graph.initializer)
               if t.SerializeToString() != u.SerializeToString()}
    assert changed == set(default_trainable(student))
    assert out.SerializeToString() == again.SerializeToString()
    assert report["export_max_rel_diff"] < 1e-4
    # another seed trains on another split and other augmentations
    other, _ = distill(student, teacher, data, steps=12, lr=3e-3, batch_size=16, seed=6, threads=1)
    assert other.SerializeToString() != out.SerializeToString()


def test_time_budget_records_steps_that_reproduce_the_run():
    teacher = zoo_model()
    student = perturbed(teacher)
    data = images(32)
    out, report = distill(student, teacher, data, time_budget_s=2.0, lr=3e-3, batch_size=8, seed=0, threads=1)
    assert report["steps"] >= 1 and report["probe_step_s"] > 0
    assert report["probe_and_train_s"] < 2.0 * 1.25 + 10
    if not report["truncated"]:
        again, _ = distill(student, teacher, data, steps=report["steps"], lr=3e-3, batch_size=8, seed=0, threads=1)
        assert again.SerializeToString() == out.SerializeToString()


def test_distillation_of_pruned_resnet20(resnet20_pruned):
    teacher = onnx.load(str(SAMPLES / "resnet20.onnx"))
    data = np.load(SAMPLES / "fmnist_calib.npz")["images"][:96]
    out, report = distill(resnet20_pruned, teacher, data, steps=4, lr=1e-3, batch_size=16, seed=0,
                          eval_limit=64, threads=1)
    assert report["bridge_max_rel_diff"] < 1e-4
    assert report["train"]["after"]["kl"] < report["train"]["before"]["kl"]
    assert structure_problems(resnet20_pruned, out) == []
    x = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    assert [o.shape for o in run(out, {"input": x})] == [o.shape for o in run(resnet20_pruned, {"input": x})]


def test_structure_problems_sees_a_changed_graph():
    model = zoo_model()
    other = onnx.ModelProto()
    other.CopyFrom(model)
    other.graph.node[6].attribute[0].i = 4 if other.graph.node[6].attribute[0].name != "group" else 2
    assert structure_problems(model, other)
    other.CopyFrom(model)
    for t in other.graph.initializer:
        if t.name == "mean":
            t.CopyFrom(_init("mean", numpy_helper.to_array(t) + 1))
    assert structure_problems(model, other) == ["initializer 'mean' is not trainable but its value changed"]
