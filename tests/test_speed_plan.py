"""The speed-aware planner: alignment, staying dense when nothing is faster, MACs targets, end to end."""

import pytest

import onnxprune.planning.speed_plan as speed_plan
from graphs import FAMILIES, GraphBuilder
from onnxprune.planning.latency import ConvOp, PROFILES
from onnxprune.ir.macs import count_macs
from onnxprune.ir.normalize import normalize
from onnxprune.pipeline import PruneConfig, prune
from onnxprune.planning.speed_plan import Layer, Option, candidate_options, plan_speed


def wide_resnet(size=32, width=64):
    """Stem, one ``width``-channel basic block, a stride-2 2·``width``-channel pair, GAP+Gemm."""
    b = GraphBuilder(size=size)
    x = b.relu(b.bn(b.conv("input", width, bias=False)))
    y = b.relu(b.bn(b.conv(x, width, bias=False)))
    y = b.bn(b.conv(y, width, bias=False))
    x = b.relu(b.add(y, x))
    y = b.relu(b.bn(b.conv(x, 2 * width, stride=2, bias=False)))
    y = b.relu(b.bn(b.conv(y, 2 * width, bias=False)))
    y = b.relu(b.bn(b.conv(y, 2 * width, bias=False)))
    b.output(b.gemm(b.gap_flatten(y), 10))
    return b.model()


@pytest.fixture(scope="module")
def model():
    return normalize(wide_resnet())


def shapes(model):
    return {layer.name: layer for layer in speed_plan.collect_layers(model, PruneConfig(groups="auto"))[0].values()}


def test_chosen_configs_are_on_the_fast_path(model):
    layers = shapes(model)
    configs = plan_speed(model, PruneConfig(groups="auto", target_macs=0.5)).configs
    pruned = {name: c for name, c in configs.items() if "skip" not in c}
    assert pruned
    for name, c in pruned.items():
        layer = layers[name]
        assert c["n_keep"] % 16 == 0 and c["n_keep"] < layer.c_in
        if c["groups"] > 1:
            per_group = layer.c_out // c["groups"]
            assert layer.c_out % c["groups"] == 0 and per_group % 16 == 0 and per_group >= 16
        if c.get("disjoint"):
            assert c["groups"] * c["n_keep"] == layer.c_in


def test_every_prunable_conv_gets_an_entry(model):
    configs = plan_speed(model, PruneConfig(groups="auto")).configs
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    assert set(configs) == set(convs)
    assert "skip" in configs[convs[0]]  # the RGB stem has too few channels


def test_macs_target_is_met(model):
    dense = count_macs(model)[0]
    for target in (0.75, 0.6, 0.5):
        plan = plan_speed(model, PruneConfig(groups="auto", target_macs=target))
        assert plan.macs_ratio <= target + speed_plan.MACS_TOLERANCE
        assert plan.macs_ratio >= target - 0.08, (target, plan.macs_ratio)
        assert plan.predicted_speedup > 1.0
    assert dense > 0


class SlowerWhenPruned:
    """A cost model where every Conv gets slower as it loses MACs (nothing pruned is faster)."""

    source = "test"

    def conv_us(self, op: ConvOp) -> float:
        return 1e12 / op.macs

    def gather_us(self, op) -> float:
        return 10.0


def test_layers_stay_dense_when_nothing_is_faster(model, monkeypatch):
    monkeypatch.setattr(speed_plan, "load_cost_model", lambda provider, path=None: SlowerWhenPruned())
    plan = plan_speed(model, PruneConfig(groups="auto", target_macs=0.6))
    assert all("skip" in c for c in plan.configs.values())
    assert plan.predicted_speedup == pytest.approx(1.0)
    assert plan.notes  # says the target was not reachable


def test_small_layers_have_no_candidates():
    tiny = Layer("c", 16, 16, 1, (3, 3), (1, 1), 8, 8, 8, 8, prunable=True)
    assert candidate_options(tiny, 16, PROFILES["cpu"]) == []


def test_disjoint_groups_are_offered_where_the_rate_allows():
    layer = Layer("c", 128, 128, 1, (3, 3), (1, 1), 28, 28, 28, 28, prunable=True)
    options = candidate_options(layer, 64, PROFILES["cpu"])
    assert Option(2, 64, disjoint=True) in options and Option(1, 64) in options
    assert all(128 // o.groups >= 16 for o in options)
    assert not any(o.disjoint for o in candidate_options(layer, 96, PROFILES["cpu"]))


def test_end_to_end_auto_prune_verifies_and_matches_predicted_macs(model):
    config = PruneConfig(groups="auto", target_macs=0.6, planner="speed")
    plan = plan_speed(model, config)
    pruned, report = prune(wide_resnet(), config)
    assert report["verify"]["passed"]
    assert report["macs_after"] / report["macs_before"] == pytest.approx(plan.macs_ratio, abs=1e-9)
    assert report["convs_pruned"] == sum(1 for c in plan.configs.values() if "skip" not in c)


@pytest.mark.parametrize("family", ["vgg", "resnet_basic", "bottleneck", "depthwise_separable"])
def test_auto_on_small_families_runs_and_verifies(family):
    _, report = prune(FAMILIES[family]().model(), PruneConfig(groups="auto"))
    assert report["verify"]["passed"]
    assert report["macs_after"] <= report["macs_before"]


def test_without_a_target_auto_cuts_what_plain_rate_pruning_would(model):
    from onnxprune.ir.analysis import find_prunable_convs
    from onnxprune.gkp.kernel_selection import n_kept

    total, per_node = count_macs(model)
    prunable, _ = find_prunable_convs(model, lambda info: 1, 16)
    expected = total - sum(per_node[i.name] * (1 - n_kept(i.c_in, 0.4375) / i.c_in) for i in prunable)
    plan = plan_speed(model, PruneConfig(groups="auto", rate=0.4375))
    assert expected / total - 0.08 <= plan.macs_ratio <= expected / total + speed_plan.MACS_TOLERANCE


@pytest.mark.parametrize("argv, fragment", [(["--target-macs", "1.5"], "--target-macs"),
                                            (["--target-speedup", "0"], "--target-speedup")])
def test_bad_targets_exit_2(tmp_path, capsys, argv, fragment):
    import onnx

    from onnxprune.cli import main

    src = tmp_path / "in.onnx"
    onnx.save(wide_resnet(), src)
    assert main([str(src), str(tmp_path / "out.onnx"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert fragment in err[-1] and not (tmp_path / "out.onnx").exists()
