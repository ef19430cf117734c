"""The plan JSON: provenance per layer (who chose the structure, who the kept channels), older
versions still load, a round trip keeps everything."""

from dataclasses import replace
import json

import numpy as np
import pytest

from graphs import resnet_basic
from onnxprune.errors import UserError
from onnxprune.pipeline import PruneConfig, prune
from onnxprune.planning.plan import PLAN_VERSION, Plan


def calib(n=40, seed=3):
    rng = np.random.default_rng(seed)
    return {"input": np.abs(rng.standard_normal((n, 3, 16, 16))).astype(np.float32)}


def test_paper_mode_says_the_paper_rule_chose_everything():
    _, report = prune(resnet_basic().model(), PruneConfig(groups=4, rate=0.5))
    for layer in report.plan.layers:
        assert layer.provenance["structure"].startswith("--groups 4 --rate 0.5")
        assert layer.provenance["channels"] == "weights: the paper's greedy grouped-kernel cost"
        assert layer.provenance["kept_fraction"] == pytest.approx(layer.kept_per_group / layer.c_in, abs=1e-4)


def test_fidelity_planner_and_calibration_are_named_where_they_decided():
    _, report = prune(resnet_basic().model(), PruneConfig(target_macs=0.6, calib=calib(), min_agreement=None))
    readers = {name for group in report["coupled"]["groups"] for name in group["consumers"]}
    layers = [layer for layer in report.plan.layers if layer.node not in readers]
    assert layers and all(layer.provenance["structure"].startswith("fidelity planner: least total output KL")
                          for layer in layers)
    for layer in report.plan.layers:  # a coupled group's readers: its structure, its channel ranking
        if layer.node in readers:
            assert layer.provenance["structure"].startswith("coupled channel group: width chosen by the fidelity")
            assert layer.provenance["channels"].startswith("coupled channel group: calibration importance")
    refits = {entry["name"]: entry for entry in report["calibration"]["layers"]}
    for layer in layers:
        data_chosen = refits[layer.node].get("data_selected_groups", 0) > 0
        assert layer.provenance["channels"].startswith("calibration: data-aware") == data_chosen
    # the report carries the same provenance per layer
    reported = {entry["name"]: entry.get("provenance") for entry in report["layers"] if "groups" in entry}
    assert all(reported[layer.node] == layer.provenance for layer in layers)


def test_round_trip_keeps_provenance_and_version_1_plans_still_load():
    _, report = prune(resnet_basic().model(), PruneConfig(groups=4, rate=0.5))
    text = report.plan.to_json()
    data = json.loads(text)
    assert data["version"] == PLAN_VERSION == 3
    again = Plan.from_json(text)
    assert [layer.provenance for layer in again.layers] == [layer.provenance for layer in report.plan.layers]
    data["version"] = 1
    for layer in data["layers"]:
        del layer["provenance"]
    old = Plan.from_json(json.dumps(data))
    assert all(layer.provenance == {} for layer in old.layers)
    _, applied = prune(resnet_basic().model(), PruneConfig(plan=old))
    assert all(layer.provenance["structure"].startswith("--plan-in") for layer in applied.plan.layers)


@pytest.mark.parametrize("change, fragment", [
    (lambda d: d.update(version=4), "plan version 4 is not supported"),
    (lambda d: d["layers"][0].update(provenance="paper"), "'provenance' must be an object"),
])
def test_bad_plans_are_refused(change, fragment):
    _, report = prune(resnet_basic().model(), PruneConfig(groups=4, rate=0.5))
    data = json.loads(report.plan.to_json())
    change(data)
    with pytest.raises(UserError, match=fragment):
        Plan.from_json(json.dumps(data))


def test_plan_in_says_so_and_recomputes_the_kept_fraction():
    _, report = prune(resnet_basic().model(), PruneConfig(groups=4, rate=0.5))
    saved = Plan.from_json(report.plan.to_json())
    layer = replace(saved.layers[0], kept_in_channels=[kept[: len(kept) // 2]
                                                       for kept in saved.layers[0].kept_in_channels])  # edited by hand
    saved.layers[0] = layer
    _, applied = prune(resnet_basic().model(), PruneConfig(plan=saved))
    first = applied.plan.layers[0].provenance
    assert first["structure"] == "--plan-in (saved: --groups 4 --rate 0.5 (the paper's rule, the same for every layer))"
    assert first["kept_fraction"] == pytest.approx(layer.kept_per_group / layer.c_in, abs=1e-4)


def test_a_calibrated_plan_replayed_gives_the_same_bytes(tmp_path):
    """--plan-out then --plan-in, with --calib and the data choosing kept channels: the replay
    must reproduce the model. It did not: the refit of a channel the data chose (but the plan's
    weight rule had dropped) was pulled towards a zeroed kernel instead of its original one, and
    the replay solved from moments over fewer channels."""
    from pathlib import Path

    from onnxprune.commands.prune import main

    samples = Path(__file__).resolve().parent.parent / "samples"
    common = [str(samples / "resnet20.onnx"), "-q", "--calib", str(samples / "fmnist_calib.npz"), "--calib-size", "128",
              "--min-agreement", "off"]
    first, again, plan = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "p.json"
    assert main([common[0], str(first), *common[1:], "--plan-out", str(plan)]) == 0
    layers = json.loads(plan.read_text())["layers"]
    assert any("data-aware" in layer["provenance"]["channels"] for layer in layers)  # the case that broke
    assert main([common[0], str(again), *common[1:], "--plan-in", str(plan)]) == 0
    assert first.read_bytes() == again.read_bytes()
