"""``--coupled-rate auto`` (coupled_candidates.py + the cluster knapsack of allocate.py): the
fidelity planner offers each coupled group's cuts beside the single-Conv cuts, the chosen output
is exact, a group's measured cost is the output change of exactly that cut, and a group whose
channels the network needs is left to the single-Conv cuts."""

import numpy as np
import onnx
import pytest

from onnxprune.calibration.calib_stream import compare_first_output
from onnxprune.channels.coupled import eligible
from onnxprune.channels.coupled_candidates import group_candidates
from onnxprune.cli import main
from onnxprune.errors import UserError
from onnxprune.ir.graph import GraphIndex
from onnxprune.ir.normalize import normalize
from onnxprune.pipeline import PruneConfig, prune
from onnxprune.planning.latency import load_cost_model
from onnxprune.planning.speed_plan import collect_layers
from oracle import feeds_for, rel_diff, run
from test_coupled import residual_stream, se_depthwise, zero_dropped_reads


def calib(n=48, seed=0):
    return {"input": np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)}


@pytest.mark.parametrize("build", [residual_stream, se_depthwise])
@pytest.mark.parametrize("with_data", [False, True])
def test_auto_output_is_exact_meets_the_target_and_reports_what_was_offered(build, with_data):
    model = build()
    config = PruneConfig(coupled_rate="auto", target_macs=0.6, calib=calib() if with_data else None)
    pruned, report = prune(model, config)
    coupled = report["coupled"]
    assert coupled["rate"] == "auto"
    assert coupled["candidates"], coupled["left_alone"]
    offered = {tuple(c["members"][0]): c for c in coupled["candidates"]}
    for group in coupled["groups"]:  # every cut is one of the offered widths
        assert group["width_after"] in offered[tuple(group["members"][0])]["widths"]
    assert report["macs_after"] <= (0.6 + 0.005) * report["macs_before"]
    # the planner's MACs are the output's: writers, readers and the depthwise Convs a group runs
    # through (se_depthwise) all counted
    assert report["auto"]["predicted_macs_ratio"] == pytest.approx(report["macs_after"] / report["macs_before"],
                                                                   abs=1e-4)
    if build is se_depthwise or not with_data:  # cases where a group is the cheapest cut
        assert coupled["groups"]
    assert report["verify"]["passed"]
    if not with_data:  # uncalibrated: the output is the original with the dropped reads zeroed
        feeds = feeds_for(model)
        assert rel_diff(run(zero_dropped_reads(model, report.plan), feeds), run(pruned, feeds)) < 1e-4
    again, _ = prune(model, config)
    assert again.SerializeToString() == pruned.SerializeToString()


def test_a_groups_measured_cost_is_the_output_change_of_that_cut_unrefit():
    """Oracle: the cut applied physically (prune_groups) with no refit, run in ORT, compared with
    the dense model on the same held-out inputs the probe uses."""
    from onnxprune.calibration.calib_stream import split_holdout
    from onnxprune.channels.coupled import plan_cuts

    model = normalize(residual_stream(head="gemm"))
    data = calib(64, seed=2)
    config = PruneConfig(groups="auto")
    layers, _, _ = collect_layers(model, config)
    found = eligible(model, 16)
    groups = group_candidates(model, layers, load_cost_model("cpu", None), 16, data, found)
    assert [g.width for g in groups] == [32, 48]
    _, held = split_holdout(data)
    dense = run(model, held)[0].astype(np.float64)
    for group in groups:
        for cut in group.cuts:
            narrowed = plan_cuts(model, found, {group.members: list(cut.kept)}, "auto", 16, "").narrowed
            expected = compare_first_output(dense, run(narrowed, held)[0].astype(np.float64))["mean_kl"]
            assert cut.cost == pytest.approx(expected, rel=1e-3, abs=1e-7)
        assert [c.saving_macs for c in group.cuts] == sorted(c.saving_macs for c in group.cuts)  # narrower saves more


def test_a_group_the_network_needs_is_left_to_the_single_conv_cuts():
    """The 32-wide stream carries a channel the head reads with a huge weight: cutting the stream
    (whatever is kept) costs far more than narrowing private chains, so auto cuts no group at a
    shallow target, where a fixed --coupled-rate would."""
    model = residual_stream()
    index = GraphIndex(model.graph)
    head = next(n for n in model.graph.node if n.name == "head")
    for init in model.graph.initializer:  # every stream channel matters to the head
        if init.name == head.input[1]:
            weight = index.constant(init.name) * 50.0
            init.CopyFrom(onnx.numpy_helper.from_array(weight.astype(np.float32), init.name))
    _, report = prune(model, PruneConfig(coupled_rate="auto", target_macs=0.85, calib=calib()))
    assert not [g for g in report["coupled"]["groups"] if g["width_before"] == 48], report["coupled"]["groups"]
    _, fixed = prune(model, PruneConfig(coupled_rate=0.5, target_macs=0.85))
    assert [g for g in fixed["coupled"]["groups"] if g["width_before"] == 48]


@pytest.mark.parametrize("argv, message", [
    (["--coupled-rate", "most"], "expected a fraction in (0, 1), 'auto' or 'off'"),
    (["--coupled-rate", "0.5", "--groups", "8"], "works with --groups auto only"),
])
def test_bad_coupled_options_exit_2_with_one_line(tmp_path, capsys, argv, message):
    src = tmp_path / "in.onnx"
    src.write_bytes(residual_stream().SerializeToString())
    out = tmp_path / "out.onnx"
    try:
        code = main([str(src), str(out), *argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "loading" not in err  # refused before any work
    assert not out.exists()


def test_a_string_rate_other_than_auto_is_a_user_error():
    with pytest.raises(UserError, match="'auto' or 'off'"):
        prune(residual_stream(), PruneConfig(coupled_rate="half"))


def test_the_console_names_the_narrowed_groups_and_counts_their_readers(tmp_path, capsys):
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    src.write_bytes(residual_stream().SerializeToString())
    assert main([str(src), str(out), "--target-macs", "0.6", "--report", str(tmp_path / "r.json")]) == 0
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    line = next(x for x in capsys.readouterr().err.splitlines() if "auto: cuts chosen" in x)
    groups = report["coupled"]["groups"]
    assert groups and f"{len(groups)} coupled channel group" in line
    assert all(f"{g['width_before']}->{g['width_after']}" in line for g in groups)
    import re

    assert re.search(rf"\b{report['convs_pruned']}/\d+ layers pruned", line)  # readers counted among them


def test_auto_is_the_default_where_the_fidelity_planner_plans_and_off_elsewhere(tmp_path):
    model = residual_stream()
    _, default = prune(model, PruneConfig(target_macs=0.6))
    assert default["coupled"]["rate"] == "auto" and default["coupled"]["groups"]
    for options in ({"planner": "speed"}, {"groups": 8}, {"coupled_rate": None}):
        _, report = prune(model, PruneConfig(target_macs=0.6, **options) if "groups" not in options
                          else PruneConfig(**options))
        assert report["coupled"] is None, options
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    src.write_bytes(model.SerializeToString())
    assert main([str(src), str(out), "--target-macs", "0.6", "--coupled-rate", "off", "-q",
                 "--report", str(tmp_path / "r.json")]) == 0
    import json

    assert json.loads((tmp_path / "r.json").read_text())["coupled"] is None


def test_the_fidelity_budget_is_searched_with_groups_chosen_at_each_depth():
    """--min-agreement searches depths; each depth has its own group cuts (here the deepest cuts
    the 32-wide stream, the depth chosen the 48-wide one), and the groups removed are the chosen
    depth's (verification would fail if the rewrite removed another depth's). A 10-class head,
    which --min-channels 10 lets the 48-wide stream's cut read."""
    model = residual_stream(classes=10)
    _, report = prune(model, PruneConfig(coupled_rate="auto", calib=calib(64), rate=0.6, min_agreement=0.7,
                                         min_channels=10))
    trials = report["budget"]["trials"]
    assert not trials[0]["meets_budget"] and report["budget"]["met"]
    assert report["coupled"]["groups"] and report["verify"]["passed"]
    chosen = next(trial for trial in trials if trial["macs_target"] == report["budget"]["chosen_macs_target"])
    assert chosen["predicted_macs_ratio"] == pytest.approx(report["macs_after"] / report["macs_before"], abs=1e-4)
    readers = {n for g in report["coupled"]["groups"] for n in g["consumers"]}
    lifted = {layer.node for layer in report.plan.layers
              if layer.provenance.get("structure", "").startswith("coupled channel group:")}
    assert lifted == readers


def _wide_stream(size=16, w=64, w2=96):
    from coupled_graphs import CoupledBuilder

    b = CoupledBuilder(size=size)
    x = b.relu(b.conv("input", w, name="stem"))
    for i in range(2):
        y = b.relu(b.conv(x, w, name=f"b{i}a"))
        x = b.relu(b.add(b.conv(y, w, name=f"b{i}b"), x))
    y = b.relu(b.conv(x, w2, stride=2, name="b2a"))
    x = b.relu(b.add(b.conv(y, w2, name="b2b"), b.conv(x, w2, k=1, stride=2, name="b2s")))
    b.output(b.gemm(b.gap_flatten(x), 10))
    return b.model()


@pytest.mark.parametrize("target", [0.1])
def test_every_budget_trial_calibrates_the_cuts_its_own_allocation_chose(monkeypatch, target):
    """A trial's options start from those before any group's narrowing: a reader of the first
    plan's groups that a shallower depth cuts on its own is planned, not silently excluded."""
    import onnxprune.calibration.calibrate as calibrate_module
    import onnxprune.planning.budget as budget_module

    real, missing = calibrate_module.calibrate, []

    def spy(model, plan, config, progress, feeds, notes):
        wanted = {name for name, c in (config.layer_configs or {}).items() if "skip" not in c}
        missing.append(sorted(wanted - {layer.node for layer in plan.layers}))
        return real(model, plan, config, progress, feeds, notes)

    monkeypatch.setattr(calibrate_module, "calibrate", spy)
    monkeypatch.setattr(budget_module, "meets", lambda *a, **k: (False, "refused"))  # every depth is tried
    data = {"input": np.random.default_rng(0).standard_normal((96, 3, 16, 16)).astype(np.float32)}
    _, report = prune(_wide_stream(), PruneConfig(coupled_rate="auto", target_macs=target, calib=data,
                                                  min_agreement=0.999))
    assert len(report["budget"]["trials"]) > 2
    assert len(missing) == len(report["budget"]["trials"]) and not any(missing), missing
