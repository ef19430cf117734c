"""--min-channels and coupled channel groups (``coupled.dense_reader``): a group whose cut would
prune a Conv reader the single-Conv rules leave dense (fewer input or output channels than
--min-channels) is not narrowed, in both ``--coupled-rate R`` and ``auto``; its writers are not
checked (as a single-Conv cut's foldable producer is not) and its kept width is not bounded by
--min-channels (as a single-Conv cut's is not). Also the skip reasons' wording: exactly the
counts below the minimum, and the no-Conv-pruned warning counting reasons by their rule."""

import json

import pytest

from coupled_graphs import CoupledBuilder
from graphs import GraphBuilder
from onnxprune.cli import main
from onnxprune.commands.console import nothing_pruned_warning
from onnxprune.ir.analysis import find_prunable_convs
from onnxprune.pipeline import PruneConfig, prune
from test_coupled import conv_shapes, residual_stream


def nmp_like():
    """basic-pitch's note head in small: a writer (C_in 8) whose 32 channels are concatenated
    after a 1-channel side branch and read by a 33 -> 1 Conv (too few output channels)."""
    b = CoupledBuilder(channels=1, size=16)
    x = b.relu(b.conv("input", 8, name="pre"))
    side = b.conv(x, 1, name="side")
    wide = b.relu(b.conv(x, 32, k=5, name="writer"))
    b.output(b.conv(b.concat([side, wide]), 1, name="final"))
    return b.model()


@pytest.mark.parametrize("rate", [0.5, "auto"])
def test_a_group_read_by_a_conv_with_too_few_output_channels_is_not_narrowed(rate):
    """Before, the 32-wide group was cut to 16 (the 33 -> 1 reader pruned, the writer narrowed)
    although the single-Conv rules leave every Conv of this model dense."""
    model = nmp_like()
    pruned, report = prune(model, PruneConfig(target_macs=0.7, coupled_rate=rate))
    assert report["coupled"]["groups"] == [] and report["convs_pruned"] == 0
    assert report["macs_after"] == report["macs_before"]
    assert conv_shapes(pruned) == conv_shapes(model)
    reasons = [entry["reason"] for entry in report["coupled"]["left_alone"] if entry["width"] == 32]
    assert len(reasons) == 1 and reasons[0].startswith("read by Conv 'final', which the single-Conv rules leave dense")
    if rate == 0.5:  # the fixed rate knows --min-channels: the reader's own skip reason
        assert reasons[0].endswith("too few channels (C_out=1 < min-channels 16)")
    else:  # auto judges by the fidelity planner's layers
        assert "C_out=1" in reasons[0]


def test_the_cli_leaves_the_group_alone_and_says_why_nothing_was_pruned(tmp_path, capsys):
    src, out, path = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    src.write_bytes(nmp_like().SerializeToString())
    assert main([str(src), str(out), "--target-macs", "0.7", "--report", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["convs_pruned"] == 0 and not report["coupled"]["groups"]
    assert {layer["name"]: layer["skipped"] for layer in report["layers"]} == {
        "pre": "too few channels (C_in=1 and C_out=8 < min-channels 16)",
        "side": "too few channels (C_in=8 and C_out=1 < min-channels 16)",
        "writer": "too few channels (C_in=8 < min-channels 16)",
        "final": "too few channels (C_out=1 < min-channels 16)"}
    warning = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warning == ["onnxprune: warning: no Conv was pruned: 4 of 4 Convs skipped because too few channels "
                       "(e.g. C_in=1 and C_out=8 < min-channels 16)"]


def test_the_rule_follows_the_callers_min_channels_and_checks_readers_not_writers():
    """residual_stream with a 10-class Conv head: the 48-wide stream it reads is left alone at
    --min-channels 16 and cut at 10; the 32-wide stream is cut either way although its writer,
    the stem, has 3 input channels (its unread filters go, as a single-Conv cut's producer's do)."""
    model = residual_stream(classes=10)
    pruned, report = prune(model, PruneConfig(coupled_rate=0.5, target_macs=0.6))
    assert [g["width_before"] for g in report["coupled"]["groups"]] == [32]
    assert conv_shapes(pruned)["stem"][0] == 16 and conv_shapes(pruned)["head"][1] == 48
    assert {"width": 48, "reason": "read by Conv 'head', which the single-Conv rules leave dense: too few channels "
                                   "(C_out=10 < min-channels 16)"} in \
        [{k: e[k] for k in ("width", "reason")} for e in report["coupled"]["left_alone"]]
    assert report["verify"]["passed"]
    _, lower = prune(model, PruneConfig(coupled_rate=0.5, target_macs=0.6, min_channels=10))
    assert [g["width_before"] for g in lower["coupled"]["groups"]] == [32, 48]


def test_auto_offers_no_cut_of_a_group_read_by_a_conv_the_rules_leave_dense():
    model = residual_stream(classes=10)
    _, report = prune(model, PruneConfig(coupled_rate="auto", target_macs=0.6))
    assert [c["width"] for c in report["coupled"]["candidates"]] == [32]
    left = [e for e in report["coupled"]["left_alone"] if "leave dense" in e["reason"]]
    assert len(left) == 1 and left[0]["width"] == 48, report["coupled"]["left_alone"]
    assert left[0]["reason"].startswith("read by Conv 'head'") and "C_out=10" in left[0]["reason"]
    _, lower = prune(model, PruneConfig(coupled_rate="auto", target_macs=0.6, min_channels=10))
    assert sorted(c["width"] for c in lower["coupled"]["candidates"]) == [32, 48]


def test_the_kept_width_is_not_bounded_by_min_channels():
    """Every reader of the 32-wide stream has 32 or more input and output channels: at
    --min-channels 32 it is cut to 16, one provider block, as a single Conv's input may be (the
    48-wide stream is left alone: its head has 16 outputs)."""
    _, report = prune(residual_stream(), PruneConfig(coupled_rate=0.5, target_macs=0.6, min_channels=32))
    assert [(g["width_before"], g["width_after"]) for g in report["coupled"]["groups"]] == [(32, 16)]
    assert report["verify"]["passed"]


def test_a_narrowed_writers_skip_reason_says_what_the_cut_changed():
    """The stem (3 -> 32) writes the 32-wide stream, cut to 16; it is planned narrowed, and its
    reason names the count below the minimum, not the narrowed C_out (16 is not < 16)."""
    _, report = prune(residual_stream(), PruneConfig(coupled_rate=0.5, target_macs=0.6))
    skipped = {entry["name"]: entry["skipped"] for entry in report["layers"] if "skipped" in entry}
    assert skipped["stem"] == "too few channels (C_in=3 < min-channels 16) (after the coupled cut: C_out 32 -> 16)"


@pytest.mark.parametrize("c_in, c_out, reason", [
    (8, 16, "too few channels (C_in=8 < min-channels 16)"),
    (32, 10, "too few channels (C_out=10 < min-channels 16)"),
    (3, 8, "too few channels (C_in=3 and C_out=8 < min-channels 16)"),
])
def test_the_skip_reason_names_exactly_the_counts_below_min_channels(c_in, c_out, reason):
    b = GraphBuilder(channels=c_in, size=8)
    b.output(b.conv("input", c_out, name="conv"))
    prunable, skipped = find_prunable_convs(b.model(), lambda info: 1, 16)
    assert prunable == [] and [(s.name, s.reason) for s in skipped] == [("conv", reason)]


def _report(*reasons):
    return {"convs_pruned": 0, "layers": [{"name": f"c{i}", "skipped": r} for i, r in enumerate(reasons)]}


def test_the_warning_counts_skip_reasons_by_their_rule_not_their_numbers():
    varied = _report("too few channels (C_in=1 < min-channels 16)", "too few channels (C_in=1 and C_out=1 < "
                     "min-channels 16)", "too few channels (C_out=8 < min-channels 16)", "depthwise", "depthwise")
    assert nothing_pruned_warning(varied) == ("no Conv was pruned: 3 of 5 Convs skipped because too few channels "
                                              "(e.g. C_in=1 < min-channels 16)")
    same = _report("not a 2-D convolution (weight rank 3)", "not a 2-D convolution (weight rank 3)",
                   "excluded by --exclude")
    assert nothing_pruned_warning(same) == ("no Conv was pruned: 2 of 3 Convs skipped because not a 2-D "
                                            "convolution (weight rank 3)")
    after_cut = _report("too few channels (C_in=3 < min-channels 16) (after the coupled cut: C_out 32 -> 16)",
                        "too few channels (C_out=1 < min-channels 16)")
    assert nothing_pruned_warning(after_cut) == (
        "no Conv was pruned: 2 of 2 Convs skipped because too few channels (e.g. C_in=3 < min-channels 16) "
        "(after the coupled cut: C_out 32 -> 16)")


def test_rate_zero_asks_for_nothing_and_gets_no_warning():
    """``--rate 0`` (the input reproduced) left every layer dense as asked: the planner's own reason
    ("no narrower width is predicted to save time") is not why, so no warning is given."""
    report = _report("auto: kept dense (no narrower width is predicted to save time on cpu)")
    report["options"] = {"rate": 0.0, "target_macs": None, "target_speedup": None, "plan_in": False,
                         "coupled_rate": "auto"}
    assert nothing_pruned_warning(report) is None
    report["options"]["target_macs"] = 0.7  # a target overrides the rate: nothing pruned is news
    assert nothing_pruned_warning(report).startswith("no Conv was pruned: 1 of 1")
