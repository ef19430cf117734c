"""pipeline.py: ``prune()`` as the Python API — a hand-made configuration gives a model that
verifies (checked here independently, in ONNX Runtime, against the original with the pruned
kernels zeroed), ``rate=0`` is the identity, the report has its documented keys and numbers,
the stages run in their documented order, and nothing is written to disk."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

from graphs import resnet_basic, vgg
from onnxprune.errors import UserError
from onnxprune.pipeline import Progress, PruneConfig, prune
from onnxprune.planning.plan import LayerPlan, Plan
from oracle import feeds_for, rel_diff, run, zero_pruned_kernels

REPORT_KEYS = {
    "onnxprune_version", "options", "macs_before", "macs_after", "params_before", "params_after",
    "params_before_normalization", "pruned_layers_macs_before", "pruned_layers_macs_after", "convs_pruned",
    "convs_skipped", "input_shapes", "layers", "verify", "auto", "budget", "coupled", "calibration", "distill",
    "speed",
    "accuracy", "gates", "timings_s"}


class Recorder(Progress):
    def __init__(self):
        self.stages = []

    def stage(self, message):
        self.stages.append(message)


def test_hand_made_config_prunes_what_it_says_and_verifies():
    """resnet_basic convs: conv1 3->16 (too few channels), conv4/conv7 16->16, conv11 16->32
    stride 2, conv14 32->32, conv16 the 1x1 projection 16->32."""
    builder = resnet_basic()
    model = builder.model()
    config = PruneConfig(groups=4, rate=0.5, exclude=("conv16",), layer_configs={
        "conv4": {"groups": 2, "n_keep": 4, "source": "test: by hand"},
        "conv7": {"skip": "test: kept dense"},
        "conv11": {"groups": 1, "n_keep": 12},
    })
    progress = Recorder()
    pruned, report = prune(model, config, progress)
    layers = {layer.node: layer for layer in report.plan.layers}
    assert sorted(layers) == ["conv11", "conv14", "conv4"]
    assert (layers["conv4"].groups, layers["conv4"].kept_per_group) == (2, 4)
    assert (layers["conv11"].groups, layers["conv11"].kept_per_group) == (1, 12)
    assert (layers["conv14"].groups, layers["conv14"].kept_per_group) == (4, 16)  # rate 0.5 of 32
    assert layers["conv4"].provenance["structure"] == "test: by hand"
    assert layers["conv14"].provenance["structure"].startswith("--groups 4 --rate 0.5")
    assert layers["conv11"].provenance["kept_fraction"] == 0.75
    skipped = {entry["name"]: entry["skipped"] for entry in report["layers"] if "skipped" in entry}
    assert skipped == {"conv1": "too few channels (C_in=3 < min-channels 16)",
                       "conv7": "test: kept dense", "conv16": "excluded by --exclude"}
    # the library's own verification passed, and an independent check agrees
    assert report["verify"]["passed"] and report["verify"]["max_rel_diff"] < 1e-4
    feeds = feeds_for(model, batch=3)
    reference = run(zero_pruned_kernels(model, report.plan.layers), feeds)
    assert rel_diff(reference, run(pruned, feeds)) < 1e-4
    assert rel_diff(run(model, feeds), reference) > 1e-3  # the cut is real
    onnx.checker.check_model(pruned, full_check=True)
    # MACs against the builder's independent count
    kept = {name: layer.kept_per_group for name, layer in layers.items()}
    assert report["macs_before"] == builder.macs()
    assert report["macs_after"] == builder.macs(kept)
    assert report["convs_pruned"] == 3 and report["convs_skipped"] == 3
    # the stages in their documented order (no calibration, auto planning or gates asked for)
    assert progress.stages == ["loading", "normalizing (folding BatchNormalization and per-channel affine ops)",
                               "planning", "rewriting", "verifying against the masked dense model in ONNX Runtime"]


@pytest.mark.parametrize("groups", [1, 4, "auto"])
def test_rate_zero_reproduces_the_input_values(groups):
    model = resnet_basic().model()
    pruned, report = prune(model, PruneConfig(rate=0.0, groups=groups))
    feeds = feeds_for(model, batch=2)
    assert rel_diff(run(model, feeds), run(pruned, feeds)) < 1e-5
    assert report["macs_after"] == report["macs_before"]
    for layer in report.plan.layers:
        assert layer.kept_per_group == layer.c_in and layer.provenance["kept_fraction"] == 1.0


def test_report_keys_and_numbers():
    model = vgg().model()
    _, report = prune(model, PruneConfig(groups=2, rate=0.5))
    assert set(report.data) == REPORT_KEYS
    options = report["options"]
    assert {k: options[k] for k in ("rate", "groups", "criterion", "seed", "min_channels", "tickets", "plan_in")} == \
        {"rate": 0.5, "groups": 2, "criterion": "tmi", "seed": 0, "min_channels": 16, "tickets": 0, "plan_in": False}
    # every option the run was given (a --target-macs run showed only rate 0.4375), JSON-safe, data named
    assert options["target_macs"] is None and options["provider"] == "cpu" and options["precision"] == "fp32"
    assert "g1_only" not in options and options["exclude"] == [] and options["layer_configs"] is None  # as given
    json.dumps(options)
    _, other = prune(model, PruneConfig(target_macs=0.7, calib={"input": np.zeros((4, 3, 16, 16), np.float32)},
                                        planner="speed", min_agreement=None))
    assert other["options"]["target_macs"] == 0.7 and other["options"]["calib"] == "<arrays>"
    assert other["options"]["layer_configs"] is None  # the planner's per-layer configs are its own, not given
    assert report["input_shapes"] == {"input": {"dims": [None, 3, 16, 16], "source": "model"}}
    assert report["params_before"] == report["params_before_normalization"]  # vgg has nothing to fold
    assert report["params_after"] < report["params_before"]
    pruned_layers = [entry for entry in report["layers"] if "skipped" not in entry]
    assert report["pruned_layers_macs_before"] == sum(e["macs_before"] for e in pruned_layers)
    assert report["pruned_layers_macs_after"] == sum(e["macs_after"] for e in pruned_layers)
    assert report["macs_before"] - report["macs_after"] == \
        report["pruned_layers_macs_before"] - report["pruned_layers_macs_after"]
    for entry in pruned_layers:
        assert set(entry) == {"name", "c_out", "c_in", "kernel", "groups", "kept_in_channels_per_group",
                              "clustering_method", "criterion", "macs_before", "macs_after", "provenance"}
        assert set(entry["provenance"]) == {"structure", "channels", "kept_fraction"}
    assert [e["name"] for e in report["layers"]] == ["conv1", "conv3", "conv6", "conv8"]  # graph order
    assert report["auto"] is None and report["calibration"] is None and report["budget"] is None
    assert report["gates"] == [] and set(report["timings_s"]) >= {"load", "normalize", "plan", "rewrite", "verify",
                                                                  "total"}
    assert json.loads(report.to_json()) == json.loads(json.dumps(report.data))


def test_auto_mode_reports_its_planner_and_sensitivity():
    _, report = prune(resnet_basic().model(), PruneConfig())
    assert report["auto"]["planner"] == "fidelity" and report["auto"]["cost_model"] == "analytical"
    assert report["sensitivity"]["source"].startswith("weights")  # no calibration data: the proxy
    assert set(report.data) == REPORT_KEYS | {"sensitivity"}


def test_a_hand_made_plan_is_applied_as_given():
    model = vgg().model()
    plan = Plan([LayerPlan("conv6", "conv6.weight", 64, 32, [3, 3], 2, list(range(63, -1, -1)),
                           [list(range(0, 32, 2)), list(range(1, 32, 2))])])
    pruned, report = prune(model, PruneConfig(plan=plan))
    assert [layer.node for layer in report.plan.layers] == ["conv6"]
    assert report.plan.layers[0].kept_in_channels == [list(range(0, 32, 2)), list(range(1, 32, 2))]
    assert report.plan.layers[0].provenance == {"structure": "--plan-in", "channels": "--plan-in",
                                                "kept_fraction": 0.5}
    assert report["options"]["plan_in"] is True
    assert plan.layers[0].provenance == {}  # the caller's plan is not stamped: the report's is a new one
    feeds = feeds_for(model)
    assert rel_diff(run(zero_pruned_kernels(model, plan.layers), feeds), run(pruned, feeds)) < 1e-4


def test_prune_takes_a_path_and_writes_nothing(tmp_path, monkeypatch):
    path = tmp_path / "in.onnx"
    onnx.save(vgg().model(), path)
    before = path.read_bytes()
    monkeypatch.chdir(tmp_path)
    from_path, _ = prune(str(path), PruneConfig(groups=2))
    from_proto, _ = prune(vgg().model(), PruneConfig(groups=2))
    assert from_path.SerializeToString(deterministic=True) == from_proto.SerializeToString(deterministic=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"] and path.read_bytes() == before


def test_the_input_proto_is_not_modified():
    model = resnet_basic().model()
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    prune(model, PruneConfig(groups=4))
    assert model == copy


def test_metadata_names_onnxprune_and_the_cut():
    pruned, report = prune(vgg().model(), PruneConfig(groups=2))
    meta = {p.key: p.value for p in pruned.metadata_props}
    assert meta["onnxprune"].endswith(f"; {report['convs_pruned']} Convs grouped-kernel pruned")


def test_an_onnxprune_output_can_be_pruned_again():
    """Pruning is a step users repeat (deeper in a second pass, or a CI job run twice): the
    output's metadata must not carry two ``onnxprune`` keys, which onnx.checker rejects."""
    model = vgg().model()
    model.metadata_props.add(key="author", value="someone")
    first, _ = prune(model, PruneConfig(groups=2))
    second, _ = prune(first, PruneConfig(groups=2, rate=0.25))
    third, _ = prune(second, PruneConfig(groups=2, rate=0.25))
    onnx.checker.check_model(third, full_check=True)
    keys = [p.key for p in third.metadata_props]
    assert keys == ["author", "onnxprune.input", "onnxprune"]
    meta = {p.key: p.value for p in third.metadata_props}
    assert meta["onnxprune.input"] == next(p.value for p in second.metadata_props if p.key == "onnxprune")


@pytest.mark.parametrize("config, fragment", [
    (PruneConfig(rate=1.0, groups=2), "--rate must be in [0, 1)"),
    (PruneConfig(groups=0), "--groups must be a positive integer"),
    (PruneConfig(planner="other"), "--planner must be"),
    (PruneConfig(min_agreement=0.9), "--min-agreement needs --calib"),
    (PruneConfig(distill=True), "--distill needs --calib"),
])
def test_option_errors_are_user_errors(config, fragment):
    with pytest.raises(UserError) as info:
        prune(vgg().model(), config)
    assert fragment in str(info.value)


def test_no_verify_skips_the_check():
    _, report = prune(vgg().model(), PruneConfig(groups=2, verify=False))
    assert report["verify"] is None and "verify" in report["timings_s"]
    assert np.isfinite(report["timings_s"]["total"])


@pytest.mark.parametrize("edit, fragment", [
    (lambda layer: replace(layer, kept_in_channels=[list(range(16)), list(range(16, 31))]),
     "every group must keep the same"),
    (lambda layer: replace(layer, kept_in_channels=[]), "0 kept-channel lists for 2 groups"),
    (lambda layer: replace(layer, filter_order=[1] + layer.filter_order[1:]), "filter_order is not a permutation"),
])
def test_a_malformed_hand_made_plan_is_a_user_error(edit, fragment):
    """Plans from --plan-in are validated on load; one made in Python gets the same checks (it
    used to fail with numpy's ValueError, or an IndexError, deep in the rewrite)."""
    from onnxprune.ir.normalize import normalize
    from onnxprune.rewriting.rewrite import apply_plan

    model = vgg().model()
    layer = LayerPlan("conv6", "conv6.weight", 64, 32, [3, 3], 2, list(range(64)), [list(range(16)),
                                                                                   list(range(16, 32))])
    layer = edit(layer)
    with pytest.raises(UserError, match=fragment):
        prune(model, PruneConfig(plan=Plan([layer])))
    with pytest.raises(UserError, match=fragment):
        apply_plan(normalize(model), Plan([layer]))


def test_the_planners_line_says_its_figures_follow_the_coupled_narrowing():
    """With --coupled-rate R the planner plans the narrowed model: its line read "0/20 layers
    pruned, MACs -0.0%" on a run that ended at -55%."""
    class Stages(Progress):
        def __init__(self):
            self.lines = []

        def stage(self, message):
            self.lines.append(message)

    stages = Stages()
    sample = Path(__file__).resolve().parent.parent / "samples" / "resnet20.onnx"
    _, report = prune(onnx.load(sample), PruneConfig(coupled_rate=0.25), stages)
    (line,) = [m for m in stages.lines if m.startswith("auto:")]
    share = float(line.split("which removed ")[1].split("%")[0])
    assert 0 < share < 100 * (1 - report["macs_after"] / report["macs_before"])
