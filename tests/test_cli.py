"""The CLI contract: exit codes, one-line errors, atomic outputs, untouched inputs."""

import hashlib
import json
import os
import subprocess
import sys

import onnx
import pytest

from graphs import resnet_basic
from onnxprune.cli import main


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _expect_error(capsys, argv, out, fragment):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and fragment in err[-1], err
    assert "Traceback" not in "\n".join(err)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_success_writes_model_report_and_plan(tmp_path, model_path, capsys):
    before = _digest(model_path)
    out, report, plan = tmp_path / "out.onnx", tmp_path / "r.json", tmp_path / "p.json"
    assert main([str(model_path), str(out), "--groups", "4", "--report", str(report), "--plan-out", str(plan)]) == 0
    assert _digest(model_path) == before
    onnx.checker.check_model(onnx.load(out), full_check=True)
    data = json.loads(report.read_text())
    for key in ("macs_before", "macs_after", "params_before", "params_after", "layers", "verify"):
        assert key in data
    assert data["macs_after"] < data["macs_before"] and data["verify"]["passed"]
    layer = next(entry for entry in data["layers"] if "skipped" not in entry)
    for key in ("name", "c_out", "c_in", "kernel", "groups", "kept_in_channels_per_group",
                "clustering_method", "criterion"):
        assert key in layer
    assert json.loads(plan.read_text())["format"] == "onnxprune-plan"
    assert "MACs" in capsys.readouterr().err


def test_output_is_byte_identical_across_runs(tmp_path, model_path):
    outs = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    for out in outs:
        assert main([str(model_path), str(out), "--groups", "4", "-q"]) == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_plan_in_reapplies_decisions(tmp_path, model_path):
    plan, a, b = tmp_path / "p.json", tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert main([str(model_path), str(a), "--groups", "4", "--plan-out", str(plan), "-q"]) == 0
    assert main([str(model_path), str(b), "--plan-in", str(plan), "-q"]) == 0
    assert a.read_bytes() == b.read_bytes()


def test_missing_input(tmp_path, capsys):
    _expect_error(capsys, [str(tmp_path / "nope.onnx"), str(tmp_path / "o.onnx")], tmp_path / "o.onnx", "no such file")


def test_not_an_onnx_file(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_text("this is not a model\n" * 10)
    _expect_error(capsys, [str(bad), str(tmp_path / "o.onnx")], tmp_path / "o.onnx", "bad.onnx")


def test_truncated_file(tmp_path, model_path, capsys):
    data = model_path.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    _expect_error(capsys, [str(cut), str(tmp_path / "o.onnx")], tmp_path / "o.onnx", "cut.onnx")


def test_out_equal_in_is_refused(model_path, capsys):
    before = _digest(model_path)
    assert main([str(model_path), str(model_path)]) == 2
    assert "must differ" in capsys.readouterr().err
    assert _digest(model_path) == before


@pytest.mark.parametrize("option", [["--rate", "1.5"], ["--rate", "-0.1"], ["--groups", "0"],
                                    ["--groups", "abc"], ["--rate", "x"], ["--min-channels", "0"]])
def test_bad_options_exit_2(tmp_path, model_path, option, capsys):
    out = tmp_path / "o.onnx"
    try:
        code = main([str(model_path), str(out), *option])
    except SystemExit as exc:  # argparse rejects non-numbers itself, with exit status 2
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.strip() and "Traceback" not in err
    assert not out.exists()


def test_bad_plan_file(tmp_path, model_path, capsys):
    plan = tmp_path / "p.json"
    plan.write_text('{"format": "something-else"}')
    _expect_error(capsys, [str(model_path), str(tmp_path / "o.onnx"), "--plan-in", str(plan)],
                  tmp_path / "o.onnx", "not an onnxprune plan")


def test_snapshot_of_another_architecture(tmp_path, model_path, capsys):
    from graphs import vgg
    snap = tmp_path / "snap.onnx"
    onnx.save(vgg().model(), snap)
    _expect_error(capsys, [str(model_path), str(tmp_path / "o.onnx"), "--tickets", str(snap)],
                  tmp_path / "o.onnx", "snapshot")


def test_console_script_exit_codes(tmp_path, model_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [sys.executable, "-m", "onnxprune.cli"]
    bad = subprocess.run(cmd + [str(model_path), str(tmp_path / "o.onnx"), "--groups", "abc"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    version = subprocess.run(cmd + ["--version"], capture_output=True, text=True, env=env)
    assert version.returncode == 0 and "onnxprune" in version.stdout
    missing = subprocess.run(cmd + ["missing.onnx", str(tmp_path / "o.onnx")], capture_output=True, text=True, env=env)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    package = subprocess.run([sys.executable, "-m", "onnxprune", "--version"], capture_output=True, text=True, env=env)
    assert package.returncode == 0 and package.stdout == version.stdout  # python -m onnxprune


def test_model_with_external_data(tmp_path):
    src = tmp_path / "ext.onnx"
    onnx.save(resnet_basic().model(), src, save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=0)
    assert (tmp_path / "ext.onnx.data").stat().st_size > 1000
    out = tmp_path / "out.onnx"
    assert main([str(src), str(out), "--groups", "2", "-q"]) == 0
    pruned = onnx.load(out)
    assert all(not t.external_data for t in pruned.graph.initializer)
    onnx.checker.check_model(pruned, full_check=True)


def test_shared_exit_code_contract(capsys):
    from onnxprune.errors import InternalError, PassFailed, UserError, run_reporting_errors

    def raises(exc):
        def run(_):
            raise exc
        return run

    assert run_reporting_errors("x", lambda a: 0, None) == 0
    assert run_reporting_errors("x", raises(UserError("bad input")), None) == 2
    assert run_reporting_errors("x", raises(PassFailed("slower than the input")), None) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["x: error: bad input", "x: failed: slower than the input"]
    # a bug (ours, or an exception nobody turned into one of the above): traceback + a report request
    for bug in (InternalError("a narrowed producer lost channels"), KeyError("weight")):
        assert run_reporting_errors("x", raises(bug), None) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[0] == "Traceback (most recent call last):"
        assert err[-1].startswith("x: internal error: ") and "please report" in err[-1]
    assert run_reporting_errors("x", raises(MemoryError()), None) == 1  # the machine's limit, not a bug
    assert capsys.readouterr().err.startswith("x: failed: out of memory")


def test_summary_of_a_calibrated_model_without_class_scores():
    """A detector calibrated with --calib has no top-1 agreement: the summary gives the relative
    error of its output instead (was: a TypeError after the model had been written, exit 1)."""
    from onnxprune.commands.console import summary

    stats = {"top1_agreement": None, "mean_kl": None}
    report = {"macs_before": 2e6, "macs_after": 1e6, "pruned_layers_macs_before": 1e6,
              "pruned_layers_macs_after": 5e5, "convs_pruned": 1, "convs_skipped": 0, "params_before": 1e5,
              "params_after": 5e4, "layers": [], "verify": None,
              "calibration": {"fit_samples": 12,
                              "fidelity": {"samples": 4, "uncalibrated": {**stats, "rel_mse": 0.0248},
                                           "calibrated": {**stats, "rel_mse": 0.0128}}}}
    text = summary(report, "out.onnx")
    assert "relative squared error of the first output against the original's on 4 held-out inputs 0.0248 -> " \
           "0.0128" in text
