"""CI gates (issue 12, item 7): a budget not met is exit 3 with no model at OUT (or OUT.failed.onnx
with --keep-failed), the report and --summary-md still written; gate options are checked before
any work (exit 2)."""

import json

import numpy as np
import onnx
import pytest

from graphs import GraphBuilder, resnet_basic
from onnxprune.checks import bench
from onnxprune.checks import gate as gate_module
from onnxprune.cli import main
from onnxprune.checks.evaluate import predict_logits
from onnxprune.checks.gate import BUDGET_NOT_MET, BudgetNotMet, evaluate_gates, failed_path
from onnxprune.pipeline import PruneConfig, prune


@pytest.fixture
def setup(tmp_path):
    """A small residual classifier, labelled data whose labels are its own predictions (so its
    accuracy is 100% and any changed prediction is a drop) and calibration inputs."""
    model = resnet_basic().model()
    path = tmp_path / "in.onnx"
    onnx.save(model, path)
    rng = np.random.default_rng(0)
    images = rng.random((40, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "eval.npz", images=images, labels=predict_logits(model, images).argmax(axis=1))
    np.savez(tmp_path / "calib.npz", input=np.abs(rng.standard_normal((48, 3, 16, 16))).astype(np.float32))
    return tmp_path


def _run(tmp, *extra):
    out = tmp / "out.onnx"
    argv = [str(tmp / "in.onnx"), str(out), "--report", str(tmp / "r.json"), "--summary-md", str(tmp / "s.md"),
            "-q", *map(str, extra)]
    return main(argv), out


def _no_temp_files(folder):
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# -- --eval-data / --max-accuracy-drop ----------------------------------------------------------

def test_accuracy_gate_passes_at_rate_zero(setup, capsys):
    code, out = _run(setup, "--groups", "8", "--rate", "0", "--eval-data", setup / "eval.npz",
                     "--max-accuracy-drop", "0")
    assert code == 0, capsys.readouterr().err
    assert out.exists()
    report = json.loads((setup / "r.json").read_text())
    assert report["accuracy"]["top1_before"] == 1.0 and report["accuracy"]["drop_points"] == 0
    assert report["gates"] == [{"gate": "max_accuracy_drop", "threshold": 0.0, "measured": 0.0, "passed": True,
                                "detail": report["gates"][0]["detail"]}]
    summary = (setup / "s.md").read_text()
    assert "**PASS**" in summary and "| --max-accuracy-drop | drop ≤ 0 pts | 0.00 pts | PASS |" in summary


def test_accuracy_gate_fails_with_exit_3_and_writes_no_model(setup, capsys):
    code, out = _run(setup, "--groups", "8", "--plan-out", setup / "p.json", "--eval-data", setup / "eval.npz",
                     "--max-accuracy-drop", "0.5")
    err = capsys.readouterr().err
    assert code == BUDGET_NOT_MET == 3
    assert not out.exists() and not (setup / "out.failed.onnx").exists() and not (setup / "p.json").exists()
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("onnxprune: budget not met: ")
    report = json.loads((setup / "r.json").read_text())  # the report says why
    gate = report["gates"][0]
    assert not gate["passed"] and gate["measured"] > 0.5
    summary = (setup / "s.md").read_text()
    assert "FAIL: budget not met" in summary and "nothing written at" in summary and "**FAIL** |" in summary
    assert _no_temp_files(setup)


def test_keep_failed_writes_the_model_beside_out(setup):
    code, out = _run(setup, "--groups", "8", "--plan-out", setup / "p.json", "--eval-data", setup / "eval.npz",
                     "--max-accuracy-drop", "0.5", "--keep-failed")
    assert code == 3 and not out.exists()
    kept = setup / "out.failed.onnx"
    onnx.checker.check_model(onnx.load(kept), full_check=True)
    assert (setup / "p.json").exists()
    assert "kept as `" + str(kept) + "`" in (setup / "s.md").read_text()


def test_eval_data_alone_measures_without_a_gate(setup):
    code, _ = _run(setup, "--groups", "8", "--eval-data", setup / "eval.npz")
    assert code == 0
    report = json.loads((setup / "r.json").read_text())
    assert report["gates"] == [] and 0 <= report["accuracy"]["top1_after"] <= 1
    summary = (setup / "s.md").read_text()
    assert "top-1 accuracy (" in summary and "| (none set) |" in summary


# -- --check-speed ------------------------------------------------------------------------------

def _fake_interleave(original_ms, pruned_ms):
    def fake(runners, repeat, warmup=3, clock=None):
        return [[original_ms / 1e3] * repeat, [pruned_ms / 1e3] * repeat]
    return fake


@pytest.mark.parametrize("pruned_ms,code", [(7.0, 0), (11.0, 3)])
def test_check_speed_is_a_gate(setup, monkeypatch, pruned_ms, code):
    monkeypatch.setattr(bench, "interleave", _fake_interleave(10.0, pruned_ms))
    got, out = _run(setup, "--groups", "8", "--check-speed")
    assert got == code and out.exists() == (code == 0)
    report = json.loads((setup / "r.json").read_text())
    assert report["speed"]["ratio"] == pytest.approx(pruned_ms / 10.0)
    assert [g["gate"] for g in report["gates"]] == ["check_speed"] and report["gates"][0]["passed"] == (code == 0)
    assert ("×" + f"{pruned_ms / 10:.3f}") in (setup / "s.md").read_text()


def test_every_gate_is_reported_when_one_fails(setup, monkeypatch):
    monkeypatch.setattr(bench, "interleave", _fake_interleave(10.0, 11.0))
    code, _ = _run(setup, "--groups", "8", "--rate", "0", "--check-speed", "--eval-data", setup / "eval.npz",
                   "--max-accuracy-drop", "1")
    assert code == 3
    gates = {g["gate"]: g["passed"] for g in json.loads((setup / "r.json").read_text())["gates"]}
    assert gates == {"max_accuracy_drop": True, "check_speed": False}


# -- --min-agreement ----------------------------------------------------------------------------

def test_min_agreement_gate_passes(setup, capsys):
    code, out = _run(setup, "--calib", setup / "calib.npz", "--min-agreement", "0.6", "--rate", "0.5")
    assert code == 0, capsys.readouterr().err
    report = json.loads((setup / "r.json").read_text())
    (gate,) = report["gates"]
    assert gate["gate"] == "min_agreement" and gate["passed"] and gate["measured"] >= 0.6
    assert "| --min-agreement | ≥ 60.0% |" in (setup / "s.md").read_text()


def _one_score_model():
    """The first output is one value per image: top-1 agreement cannot be measured."""
    b = GraphBuilder()
    x = b.relu(b.conv("input", 16))
    x = b.relu(b.conv(x, 32))
    x = b.relu(b.conv(x, 32))
    b.output(b.gemm(b.gap_flatten(x), 1))
    return b.model()


def test_min_agreement_is_refused_before_any_work_when_agreement_cannot_be_measured(setup, capsys):
    onnx.save(_one_score_model(), setup / "in.onnx")
    code, out = _run(setup, "--calib", setup / "calib.npz", "--min-agreement", "0.9")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert "cannot be measured" in err[-1] and "'fc9_out' (48x1 on the calibration inputs)" in err[-1]
    assert not any("planning" in line for line in err)  # refused from the first calibration batch
    # without the option the same model prunes (calibration reports the relative squared error)
    code, out = _run(setup, "--calib", setup / "calib.npz")
    assert code == 0 and out.exists(), capsys.readouterr().err


def test_min_agreement_gate_fails_when_agreement_was_not_measured():
    report = {"calibration": {"fidelity": {"samples": 16, "on": "held-out samples",
                                           "calibrated": {"top1_agreement": None}}}}
    (gate,) = evaluate_gates(report, PruneConfig(min_agreement=0.9))
    assert not gate["passed"] and gate["measured"] is None and "cannot be measured" in gate["detail"]


def test_min_agreement_gate_judges_the_final_agreement():
    report = {"calibration": {"fidelity": {"samples": 16, "on": "held-out samples",
                                           "calibrated": {"top1_agreement": 0.9}}}}
    (gate,) = evaluate_gates(report, PruneConfig(min_agreement=0.95))
    assert not gate["passed"] and gate["measured"] == 0.9 and "90.0% on 16 held-out samples" in gate["detail"]
    # distilled weights that were kept are what ships: their held-out agreement is judged
    report["distill"] = {"kept": True, "holdout": {"after": {"top1_agreement": 0.96, "count": 16}}}
    (gate,) = evaluate_gates(report, PruneConfig(min_agreement=0.95))
    assert gate["passed"] and gate["measured"] == 0.96
    assert evaluate_gates(report, PruneConfig()) == []  # the "auto" default is a planning aim, not a gate


# -- Python API, names, option checks ------------------------------------------------------------

def test_prune_raises_budget_not_met_with_the_model_and_report(setup, monkeypatch):
    monkeypatch.setattr(bench, "interleave", _fake_interleave(10.0, 11.0))
    with pytest.raises(BudgetNotMet, match="slower than the input") as exc:
        prune(str(setup / "in.onnx"), PruneConfig(groups=8, check_speed=True))
    assert isinstance(exc.value, RuntimeError)  # as --check-speed's failure was before
    assert exc.value.report["gates"][0]["gate"] == "check_speed"
    onnx.checker.check_model(exc.value.model)


def test_failed_path():
    assert failed_path("a/out.onnx") == "a/out.failed.onnx"
    assert failed_path("out.ONNX") == "out.failed.onnx"
    assert failed_path("model") == "model.failed.onnx"


@pytest.mark.parametrize("extra,fragment", [
    (["--max-accuracy-drop", "1"], "--max-accuracy-drop needs --eval-data"),
    (["--eval-data", "{t}/eval.npz", "--max-accuracy-drop", "-1"], "percentage points"),
    (["--eval-data", "{t}/eval.npz", "--max-accuracy-drop", "nan"], "percentage points"),
    (["--keep-failed"], "--keep-failed needs a gate"),
    (["--eval-data", "{t}/missing.npz"], "no such file"),
    (["--eval-data", "{t}/calib.npz"], "expected arrays 'images' and 'labels'"),
    (["--eval-data", "{t}/small.npz"], "--eval-data"),  # the model cannot run on 8x8 images
    (["--summary-md", "{t}/in.onnx"], "--summary-md must differ from IN.onnx"),
    (["--summary-md", "{t}/r.json"], "--summary-md must differ from --report"),
    (["--eval-data", "{t}/eval.npz", "--summary-md", "{t}/eval.npz"], "must differ from --eval-data"),
    (["--check-speed", "--keep-failed", "--report", "{t}/out.failed.onnx"], "--keep-failed must differ from --report"),
])
def test_gate_options_are_checked_before_any_work(setup, capsys, extra, fragment):
    rng = np.random.default_rng(0)
    np.savez(setup / "small.npz", images=rng.random((4, 3, 8, 8)).astype(np.float32), labels=np.zeros(4, np.int64))
    before = {p.name: p.read_bytes() for p in setup.iterdir()}
    out = setup / "out.onnx"
    code = main([str(setup / "in.onnx"), str(out), "--report", str(setup / "r.json"),
                 *(arg.format(t=setup) for arg in extra)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and fragment in err[0], err
    assert "planning" not in "\n".join(err)
    assert {p.name: p.read_bytes() for p in setup.iterdir()} == before  # nothing written, nothing changed


@pytest.mark.parametrize("mode", [["--groups", "8"], ["--planner", "speed"]], ids=["groups8", "speed"])
def test_min_agreement_is_a_check_only_gate_outside_the_fidelity_planner(setup, capsys, monkeypatch, mode):
    """With a structure the fidelity planner does not choose, --min-agreement plans nothing and
    checks the result (it used to be refused with exit 2): a kept budget passes, a missed one
    fails with exit 3 and no model written."""
    code, out = _run(setup, "--calib", setup / "calib.npz", "--min-agreement", "0.01", "--rate", "0.5", *mode)
    assert code == 0, capsys.readouterr().err
    report = json.loads((setup / "r.json").read_text())
    assert "budget" not in report or not report["budget"]
    (gate,) = report["gates"]
    assert gate["gate"] == "min_agreement" and gate["passed"]
    out.unlink()
    # this small model keeps 100% on its 6 held-out inputs at any rate: the measurement is replaced
    monkeypatch.setattr(gate_module, "final_agreement", lambda report: (0.5, 6, "held-out samples"))
    code, out = _run(setup, "--calib", setup / "calib.npz", "--min-agreement", "0.9", "--rate", "0.5", *mode)
    (gate,) = json.loads((setup / "r.json").read_text())["gates"]
    assert code == 3 and not out.exists() and not gate["passed"] and gate["measured"] == 0.5
