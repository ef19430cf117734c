"""End-to-end exactness of the rewrite on every graph family the core must handle."""

from dataclasses import replace
import onnx
import pytest

from graphs import FAMILIES, inverted_residual, resnet_basic, vgg
from onnxprune.gkp import kernel_selection
from onnxprune.pipeline import PruneConfig, prune
from oracle import feeds_for, rel_diff, run, zero_pruned_kernels

RATE = 0.4375


def _check_pruned(builder, groups, rate=RATE, **kw):
    model = builder.model()
    pruned, report = prune(model, PruneConfig(rate=rate, groups=groups, **kw))
    onnx.checker.check_model(pruned, full_check=True)
    assert pruned.ir_version == model.ir_version
    assert [o.version for o in pruned.opset_import] == [o.version for o in model.opset_import]
    assert [o.name for o in pruned.graph.output] == [o.name for o in model.graph.output]
    feeds = feeds_for(model)
    reference = run(zero_pruned_kernels(model, report.plan.layers), feeds)
    assert rel_diff(reference, run(pruned, feeds)) < 1e-4
    kept = {layer.node: layer.kept_per_group for layer in report.plan.layers}
    batch = model.graph.input[0].type.tensor_type.shape.dim[0].dim_value or 1  # symbolic -> 1
    assert report["macs_before"] == batch * builder.macs()
    assert report["macs_after"] == batch * builder.macs(kept)
    return model, pruned, report


@pytest.mark.parametrize("groups", [2, 4, 8])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pruned_model_equals_masked_dense_model(family, groups):
    _, pruned, report = _check_pruned(FAMILIES[family](), groups)
    assert report["convs_pruned"] >= 2
    for layer in report.plan.layers:
        assert layer.groups == groups
        assert layer.kept_per_group == kernel_selection.n_kept(layer.c_in, RATE)
    grouped = [n for n in pruned.graph.node if n.op_type == "Conv"
               and any(a.name == "group" and a.i == groups for a in n.attribute)]
    assert len(grouped) >= report["convs_pruned"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("groups", [1, 4])
def test_rate_zero_reproduces_original_outputs(family, groups):
    builder = FAMILIES[family]()
    model = builder.model()
    pruned, report = prune(model, PruneConfig(rate=0.0, groups=groups))
    feeds = feeds_for(model)
    assert rel_diff(run(model, feeds), run(pruned, feeds)) < 1e-5
    assert report["verify"]["passed"]


@pytest.mark.parametrize("opset", [11, 13, 17])
@pytest.mark.parametrize("family", ["resnet_basic", "depthwise_separable", "concat"])
def test_opsets(opset, family):
    _check_pruned(FAMILIES[family](opset=opset), 4)


@pytest.mark.parametrize("batch", ["N", 1, 3])
def test_symbolic_and_fixed_batch(batch):
    _check_pruned(resnet_basic(batch=batch), 2)


def test_weights_as_constant_nodes():
    builder = resnet_basic(constant_weights=True)
    model, pruned, _ = _check_pruned(builder, 4)
    assert any(n.op_type == "Constant" for n in model.graph.node)
    assert not any(n.op_type == "Constant" for n in pruned.graph.node)


def test_conv_without_bias_and_with_bias():
    _check_pruned(resnet_basic(bn=True), 4)  # convs without bias, BN carries it
    _check_pruned(resnet_basic(bn=False), 4)  # convs with their own bias


def test_skip_reasons_are_reported():
    _, _, report = _check_pruned(FAMILIES["depthwise_separable"](), 4)
    reasons = {entry["name"]: entry["skipped"] for entry in report["layers"] if "skipped" in entry}
    assert any("depthwise" in r for r in reasons.values())
    assert any("too few channels" in r for r in reasons.values())


def test_exclude_keeps_layer_dense():
    builder = vgg()
    model = builder.model()
    _, report = prune(model, PruneConfig(groups=2, exclude=("conv3",)))
    assert "conv3" not in {layer.node for layer in report.plan.layers}
    assert {"name": "conv3", "skipped": "excluded by --exclude"} in report["layers"]


def test_groups_not_dividing_c_out_are_skipped():
    _, report = prune(vgg().model(), PruneConfig(groups=64))
    assert report["convs_pruned"] == 1  # only the 64-filter conv
    assert any("not divisible" in e.get("skipped", "") for e in report["layers"])


@pytest.mark.parametrize("opset", [17, 18])
def test_reduce_mean_reshape_head_needs_no_restore(opset):
    _, pruned, _ = _check_pruned(FAMILIES["reduce_mean_head"](opset=opset), 4)
    assert not [n for n in pruned.graph.node if "restore" in n.name]


def test_permutations_fold_into_gemm_and_next_convs():
    """No Gather reads a Gather, and the classifier head reads the permuted tensor directly."""
    _, pruned, _ = _check_pruned(resnet_basic(), 4)
    producers = {o: n for n in pruned.graph.node for o in n.output}
    for node in pruned.graph.node:
        if node.op_type == "Gather":
            assert producers.get(node.input[0], node).op_type != "Gather"
    gemm = next(n for n in pruned.graph.node if n.op_type == "Gemm")
    assert producers[gemm.input[0]].op_type == "Flatten"
    # First residual Add: permuted + identity operand -> one restore. Second: two differently
    # permuted operands -> one aligning Gather, and the order travels on into the Gemm.
    fixups = [n for n in pruned.graph.node if n.op_type == "Gather" and ("restore" in n.name or "align" in n.name)]
    assert len(fixups) <= 2


def test_fan_out_tensor_feeding_two_convs_and_add():
    _, pruned, report = _check_pruned(FAMILIES["fan_out"](), 4)
    assert report["convs_pruned"] == 4  # all but the 3-channel stem


def test_prune_is_deterministic():
    model = resnet_basic().model()
    first, _ = prune(model, PruneConfig(groups=4, seed=3))
    second, _ = prune(model, PruneConfig(groups=4, seed=3))
    assert first.SerializeToString(deterministic=True) == second.SerializeToString(deterministic=True)


def test_plan_round_trip_reproduces_the_model():
    from onnxprune.planning.plan import Plan

    model = resnet_basic().model()
    first, report = prune(model, PruneConfig(groups=4))
    plan = Plan.from_json(report.plan.to_json())
    second, _ = prune(model, PruneConfig(plan=plan))
    assert first.SerializeToString(deterministic=True) == second.SerializeToString(deterministic=True)


def test_verify_catches_a_wrong_rewrite():
    from onnxprune.ir.normalize import normalize
    from onnxprune.rewriting.rewrite import apply_plan
    from onnxprune.checks.verify import verify
    from onnx import numpy_helper

    model = normalize(vgg().model())
    _, report = prune(model, PruneConfig(groups=2))
    rewritten = apply_plan(model, report.plan)
    assert verify(model, rewritten, report.plan).passed
    weight = next(t for t in rewritten.graph.initializer if t.name == report.plan.layers[0].weight)
    broken = numpy_helper.to_array(weight).copy()
    broken[0, 0, 0, 0] += 1.0
    weight.CopyFrom(numpy_helper.from_array(broken, weight.name))
    result = verify(model, rewritten, report.plan)
    assert not result.passed and result.max_rel_diff > 1e-3


def _gathers_feeding(model):
    producers = {o: n for n in model.graph.node for o in n.output}
    return {n.name for n in model.graph.node if n.op_type == "Conv"
            and producers.get(n.input[0]) is not None and producers[n.input[0]].op_type == "Gather"}


def test_g1_selection_narrows_producers_instead_of_gathering():
    """G=1 keeps the same input channels for all filters: the producer computes only those."""
    builder = vgg()
    model = builder.model()
    pruned, report = prune(model, PruneConfig(rate=0.5, groups=1))
    assert not [n for n in pruned.graph.node if n.op_type == "Gather"]
    feeds = feeds_for(model)
    assert rel_diff(run(zero_pruned_kernels(model, report.plan.layers), feeds), run(pruned, feeds)) < 1e-4
    # 16x16 input; conv1 3->32 (narrowed to 16), conv2 32->32 (reads 16, narrowed to 16),
    # maxpool to 8x8, conv3 32->64 (reads 16, narrowed to 32), conv4 64->32 (reads 32).
    expected = 16 * 16 * 16 * 3 * 9 + 16 * 16 * 16 * 16 * 9 + 8 * 8 * 32 * 16 * 9 + 8 * 8 * 32 * 32 * 9
    assert report["macs_after"] == expected


def test_disjoint_groups_fold_gather_into_dense_producer():
    from onnxprune.planning.plan import Plan

    model = vgg().model()
    _, report = prune(model, PruneConfig(rate=0.5, groups=2))
    plan = Plan.from_json(report.plan.to_json())
    plan.layers = [replace(layer, kept_in_channels=[list(range(0, layer.c_in, 2)), list(range(1, layer.c_in, 2))])
                   for layer in plan.layers]  # each input channel kept by exactly one group
    pruned, report = prune(model, PruneConfig(plan=plan))
    feeds = feeds_for(model)
    assert rel_diff(run(zero_pruned_kernels(model, plan.layers), feeds), run(pruned, feeds)) < 1e-4
    gathered = _gathers_feeding(pruned)
    assert "conv3" not in gathered  # its producer, the dense stem conv1: the permutation folded into it
    assert "conv6" in gathered  # its producer conv3 is grouped: its output order is not free


def test_stale_value_info_of_weights_and_narrowed_tensors_is_dropped():
    """Exporters (torch dynamo) annotate weights and activations with shapes; pruning changes some."""
    model = vgg().model()
    model = onnx.shape_inference.infer_shapes(model)
    for init in model.graph.initializer:
        model.graph.value_info.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    pruned, report = prune(model, PruneConfig(rate=0.5, groups=1))
    onnx.checker.check_model(pruned, full_check=True)
    assert report["verify"]["passed"]


def test_g1_cut_of_a_project_conv_narrows_the_depthwise_chain_without_a_gather():
    """Keeping n of the project Conv's inputs drops the other hidden channels everywhere: the
    expand Conv computes n filters, the depthwise Conv runs n channels, and no Gather is left."""
    model = inverted_residual().model()
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    project = convs[3]
    configs = {name: {"skip": "test: only the project Conv is cut"} for name in convs if name != project}
    configs[project] = {"groups": 1, "n_keep": 48}
    pruned, report = prune(model, PruneConfig(groups=1, layer_configs=configs))
    assert [layer.node for layer in report.plan.layers] == [project]
    assert not [n for n in pruned.graph.node if n.op_type == "Gather"]
    depthwise = [n for n in pruned.graph.node if n.op_type == "Conv"
                 and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    assert [a.i for a in depthwise[0].attribute if a.name == "group"] == [48]
    feeds = feeds_for(model)
    reference = run(zero_pruned_kernels(model, report.plan.layers), feeds)
    assert rel_diff(reference, run(pruned, feeds)) < 1e-4
    assert report["macs_after"] < report["macs_before"] - builder_hidden_macs_saved()


def builder_hidden_macs_saved():
    """MACs the expand and depthwise Convs no longer spend on 48 of 96 hidden channels (16×16)."""
    return 48 * 32 * 16 * 16 + 48 * 9 * 16 * 16 - 1
