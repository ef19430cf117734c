"""Issue 12, "never a traceback, never a lost file": inputs are never written, outputs appear
all at once with normal modes, every refusal is one line on stderr with exit status 2."""

import errno
import json
import os
import stat
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxprune.commands.prune as cli  # the prune command: where it looks up prune, load_model, the writers
from graphs import resnet_basic
from onnxprune.cli import main
from onnxprune.errors import one_line
from onnxprune.ir.model_io import text_writer, write_files


from test_cli import _digest


def _files(folder):
    return sorted(p.name for p in folder.rglob("*"))


def _refused(capsys, argv, fragment, code=2):
    """``main(argv)`` exits ``code`` with exactly one stderr line holding ``fragment``."""
    assert main(argv) == code
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and fragment in err[0], err
    return err[0]


def _no_work(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("work started before the paths were checked")
    monkeypatch.setattr(cli, "prune", fail)
    monkeypatch.setattr(cli, "load_model", fail)


# -- 1. no input is ever written ------------------------------------------------------------

@pytest.fixture
def inputs(tmp_path, model_path):
    """Every kind of input file, each with its option."""
    snap = tmp_path / "snap.onnx"
    snap.write_bytes(model_path.read_bytes())
    calib = tmp_path / "calib.npy"
    np.save(calib, np.zeros((2, 3, 16, 16), np.float32))
    plan, table = tmp_path / "plan.json", tmp_path / "table.json"
    plan.write_text("{}")
    table.write_text("{}")
    return {"IN": model_path, "--tickets": snap, "--calib": calib, "--plan-in": plan, "--latency-table": table}


@pytest.mark.parametrize("out_option", ["OUT", "--report", "--plan-out"])
@pytest.mark.parametrize("in_option", ["IN", "--tickets", "--calib", "--plan-in", "--latency-table"])
def test_an_output_that_is_an_input_is_refused_before_any_work(tmp_path, inputs, in_option, out_option,
                                                                capsys, monkeypatch):
    _no_work(monkeypatch)
    target = inputs[in_option]
    before = {name: _digest(path) for name, path in inputs.items()}
    listing = _files(tmp_path)
    out = target if out_option == "OUT" else tmp_path / "out.onnx"
    argv = [str(inputs["IN"]), str(out)]
    argv += [] if out_option == "OUT" else [out_option, str(target)]
    argv += [] if in_option == "IN" else [in_option, str(target)]
    _refused(capsys, argv, "must differ")
    assert {name: _digest(path) for name, path in inputs.items()} == before
    assert _files(tmp_path) == listing


@pytest.mark.parametrize("pair", [("OUT", "--report"), ("OUT", "--plan-out"), ("--report", "--plan-out")])
def test_two_outputs_on_one_path_are_refused(tmp_path, model_path, pair, capsys, monkeypatch):
    _no_work(monkeypatch)
    same = tmp_path / "same.json"
    argv = [str(model_path), str(same if "OUT" in pair else tmp_path / "out.onnx")]
    argv += [arg for option in pair if option != "OUT" for arg in (option, str(same))]
    _refused(capsys, argv, "must differ")
    assert not same.exists() and not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("link", ["symlink", "hardlink", "dotted"])
def test_outputs_are_compared_through_links(tmp_path, model_path, link, capsys, monkeypatch):
    _no_work(monkeypatch)
    before = _digest(model_path)
    alias = tmp_path / "alias.onnx"
    if link == "symlink":
        alias.symlink_to(model_path)
    elif link == "hardlink":
        os.link(model_path, alias)
    else:
        (tmp_path / "sub").mkdir()
        alias = tmp_path / "sub" / ".." / model_path.name
    _refused(capsys, [str(model_path), str(tmp_path / "out.onnx"), "--report", str(alias)], "must differ")
    assert _digest(model_path) == before


# -- 2. outputs that cannot be written ------------------------------------------------------

@pytest.mark.parametrize("option", ["IN", "OUT", "--report", "--plan-out", "--plan-in", "--summary-md",
                                    "--latency-table", "--calib", "--tickets", "--eval-data"])
def test_an_empty_path_is_refused_before_any_work(tmp_path, model_path, option, capsys, monkeypatch):
    """``onnxprune in.onnx "$OUT"`` with OUT unset ran the whole pass, wrote nothing and exited 0."""
    _no_work(monkeypatch)
    argv = ["" if option == "IN" else str(model_path), "" if option == "OUT" else str(tmp_path / "out.onnx")]
    argv += [] if option in ("IN", "OUT") else [option, ""]
    label = {"IN": "IN.onnx", "OUT": "OUT.onnx"}.get(option, option)
    _refused(capsys, argv, f"{label} is empty")
    assert _files(tmp_path) == ["in.onnx"]


def test_output_that_is_a_folder(tmp_path, model_path, capsys):
    (tmp_path / "taken").mkdir()
    _refused(capsys, [str(model_path), str(tmp_path / "out.onnx"), "--report", str(tmp_path / "taken")], "folder")
    assert not (tmp_path / "out.onnx").exists()


def test_output_in_a_missing_folder(tmp_path, model_path, capsys):
    _refused(capsys, [str(model_path), str(tmp_path / "out.onnx"), "--plan-out", str(tmp_path / "no" / "p.json")],
             "does not exist")
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes to read-only folders")
def test_output_in_a_read_only_folder(tmp_path, model_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        _refused(capsys, [str(model_path), str(folder / "out.onnx")], "not writable")
    finally:
        folder.chmod(0o700)


@pytest.mark.parametrize("failing", ["model", "report"])
def test_disk_full_writes_nothing(tmp_path, model_path, failing, capsys, monkeypatch):
    """ENOSPC while writing any output: one line, exit 2, no output at all, no temporary file."""
    def full(*_):
        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write

    monkeypatch.setattr(cli, "model_writer" if failing == "model" else "text_writer", full)
    before = _digest(model_path)
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    line = _refused(capsys, [str(model_path), str(out), "--groups", "4", "-q", "--report", str(report)],
                    "No space left on device")
    assert str(out if failing == "model" else report) in line
    assert _files(tmp_path) == ["in.onnx"] and _digest(model_path) == before


def test_permission_denied_at_write_time(tmp_path, model_path, capsys, monkeypatch):
    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    _refused(capsys, [str(model_path), str(tmp_path / "out.onnx"), "--groups", "4", "-q"], "Permission denied")
    assert _files(tmp_path) == ["in.onnx"]


def test_write_files_is_all_or_nothing(tmp_path):
    def broken(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    (tmp_path / "b.txt").write_text("old")
    with pytest.raises(cli.UserError, match="c.txt: No space left"):
        write_files({tmp_path / "a.txt": text_writer("new"), tmp_path / "b.txt": text_writer("new"),
                     tmp_path / "c.txt": broken})
    assert _files(tmp_path) == ["b.txt"] and (tmp_path / "b.txt").read_text() == "old"


# -- 3. normal file modes -------------------------------------------------------------------

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_respect_the_umask(tmp_path, model_path, umask, mode):
    paths = [tmp_path / "out.onnx", tmp_path / "r.json", tmp_path / "p.json"]
    old = os.umask(umask)
    try:
        assert main([str(model_path), str(paths[0]), "--groups", "4", "-q", "--report", str(paths[1]),
                     "--plan-out", str(paths[2])]) == 0
    finally:
        os.umask(old)
    assert [stat.S_IMODE(p.stat().st_mode) for p in paths] == [mode] * 3


# -- 4. bad --seed, malformed plans ---------------------------------------------------------

@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_seed_out_of_range(tmp_path, model_path, seed, capsys):
    _refused(capsys, [str(model_path), str(tmp_path / "o.onnx"), "--groups", "4", "--seed", seed], "--seed")
    assert not (tmp_path / "o.onnx").exists()


@pytest.fixture
def plan_data(tmp_path, model_path):
    plan = tmp_path / "good.json"
    assert main([str(model_path), str(tmp_path / "a.onnx"), "--groups", "4", "-q", "--plan-out", str(plan)]) == 0
    return json.loads(plan.read_text())


@pytest.mark.parametrize("edit, fragment", [
    (lambda d: d["layers"][0].update(groups="4"), "'groups' must be an integer"),
    (lambda d: d["layers"][0].update(groups=4.0), "'groups' must be an integer"),
    (lambda d: d["layers"][0].update(c_out=None), "'c_out' must be an integer"),
    (lambda d: d["layers"][0].update(filter_order="0 1 2"), "'filter_order' must be a list of integers"),
    (lambda d: d["layers"][0].update(kept_in_channels=[0, 1]), "'kept_in_channels' must be a list of integer lists"),
    (lambda d: d["layers"][0].update(kernel=3), "'kernel' must be a list of 2 integers"),
    (lambda d: d["layers"][0].pop("weight"), "'weight' is missing"),
    (lambda d: d["layers"][0].update(colour="red"), "unknown field(s) colour"),
    (lambda d: d.update(layers={"conv4": {}}), "'layers' must be a list"),
    (lambda d: d.pop("layers"), "'layers' must be a list"),
    (lambda d: d.update(skipped=["conv1"]), "'skipped' must be a list of objects"),
    (lambda d: d.update(options=[1]), "'options' must be an object"),
    (lambda d: d["layers"].append(dict(d["layers"][0])), "more than once"),
])
def test_malformed_plan_fields(tmp_path, model_path, plan_data, edit, fragment, capsys):
    edit(plan_data)
    plan = tmp_path / "bad.json"
    plan.write_text(json.dumps(plan_data))
    _refused(capsys, [str(model_path), str(tmp_path / "o.onnx"), "--plan-in", str(plan)], fragment)
    assert not (tmp_path / "o.onnx").exists()


def test_binary_plan_file(tmp_path, model_path, capsys):
    plan = tmp_path / "bin.json"
    plan.write_bytes(bytes(range(256)))
    _refused(capsys, [str(model_path), str(tmp_path / "o.onnx"), "--plan-in", str(plan)], "--plan-in")


# -- 5. options that would silently do nothing ----------------------------------------------

def test_mistyped_exclude_names_the_unknown_node(tmp_path, model_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "prune", lambda *a, **k: pytest.fail("planned despite a bad --exclude"))
    line = _refused(capsys, [str(model_path), str(tmp_path / "o.onnx"), "--exclude", "conv4", "cnov7"], "'cnov7'")
    assert "conv7" in line and "'conv4'" not in line


def test_exclude_accepts_the_names_given_to_unnamed_convs(tmp_path, capsys):
    model = resnet_basic().model()
    for node in model.graph.node:
        node.name = ""
    src, out, report = tmp_path / "anon.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(model, src)
    name = next(f"Conv_{i}" for i, n in enumerate(model.graph.node) if n.op_type == "Conv" and i > 0)
    assert main([str(src), str(out), "--groups", "4", "-q", "--exclude", name, "--report", str(report)]) == 0
    layers = {layer["name"]: layer for layer in json.loads(report.read_text())["layers"]}
    assert layers[name]["skipped"] == "excluded by --exclude"


def test_groups_that_divide_no_layer_warn(tmp_path, model_path, capsys):
    assert main([str(model_path), str(tmp_path / "o.onnx"), "--groups", "7", "-q"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "warning" in err[0] and "not divisible" in err[0] and "--groups" in err[0], err


def test_no_warning_when_something_is_pruned(tmp_path, model_path, capsys):
    assert main([str(model_path), str(tmp_path / "o.onnx"), "--groups", "4", "-q"]) == 0
    assert capsys.readouterr().err == ""


# -- 6. one line per error ------------------------------------------------------------------

def _garbage(tmp_path, model_path):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(300))
    return path


def _truncated(tmp_path, model_path):
    path = tmp_path / "cut.onnx"
    path.write_bytes(model_path.read_bytes()[:40000])
    return path


def _dangling(tmp_path, model_path):  # onnx.checker's message spans three lines
    model = onnx.load(model_path)
    model.graph.node[1].input[0] = "nowhere"
    path = tmp_path / "dangling.onnx"
    onnx.save(model, path)
    return path


def _ort_refuses(tmp_path, model_path):  # a valid ONNX graph with an op ORT does not know
    model = onnx.load(model_path)
    old = model.graph.output[0]
    model.graph.node.append(helper.make_node("Frobnicate", [old.name], ["y"], domain="com.example", name="frob"))
    new = onnx.ValueInfoProto()
    new.CopyFrom(old)
    new.name = "y"
    del model.graph.output[:]
    model.graph.output.append(new)
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("make, fragment", [(_garbage, "garbage.onnx"), (_truncated, "cut.onnx"),
                                            (_dangling, "is not output of any previous nodes"),
                                            (_ort_refuses, "ONNX Runtime cannot load")])
def test_unusable_models_give_one_line(tmp_path, model_path, make, fragment, capsys):
    bad = make(tmp_path, model_path)
    _refused(capsys, [str(bad), str(tmp_path / "o.onnx"), "--groups", "4", "-q"], fragment)
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("make", [_garbage, _truncated, _dangling])
def test_unreadable_model_is_one_line_even_without_quiet(tmp_path, model_path, make, capsys):
    bad = make(tmp_path, model_path)
    _refused(capsys, [str(bad), str(tmp_path / "o.onnx")], bad.name)


@pytest.mark.parametrize("content", [b"hello\n", b"PK\x03\x04broken zip"])
def test_bad_calibration_file_gives_one_line(tmp_path, model_path, content, capsys):
    calib = tmp_path / "calib.npz"
    calib.write_bytes(content)
    _refused(capsys, [str(model_path), str(tmp_path / "o.onnx"), "-q", "--calib", str(calib)], "calib.npz")


def test_usage_errors_are_one_line(tmp_path, model_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(model_path), str(tmp_path / "o.onnx"), "--groups", "abc"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "--groups" in err[0] and "--help" in err[0], err


def test_one_line_joins_library_messages():
    assert one_line("first\n\n  second  \nthird") == "first second third"
    assert len(one_line("x" * 5000)) <= 1000


# -- 7. Ctrl-C ------------------------------------------------------------------------------

def test_ctrl_c_during_the_pass(tmp_path, model_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "prune", interrupted)
    _refused(capsys, [str(model_path), str(tmp_path / "o.onnx"), "--report", str(tmp_path / "r.json")],
             "interrupted", code=130)
    assert _files(tmp_path) == ["in.onnx"]


def test_ctrl_c_while_writing_leaves_no_output(tmp_path, model_path, capsys, monkeypatch):
    def interrupted(text):
        def write(tmp):
            raise KeyboardInterrupt
        return write

    monkeypatch.setattr(cli, "text_writer", interrupted)
    _refused(capsys, [str(model_path), str(tmp_path / "o.onnx"), "--groups", "4", "-q",
                      "--report", str(tmp_path / "r.json")], "interrupted", code=130)
    assert _files(tmp_path) == ["in.onnx"]


def test_sigint_exits_130_with_one_line(tmp_path, model_path):
    script = ("import os, signal, sys, time\n"
              "import onnxprune.commands.prune as cli\n"
              "def prune(*args, **kwargs):\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    time.sleep(10)\n"
              "cli.prune = prune\n"
              "sys.exit(cli.main(sys.argv[1:]))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run([sys.executable, "-c", script, str(model_path), str(tmp_path / "o.onnx"), "-q"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 130 and run.stderr.splitlines() == ["onnxprune: interrupted; nothing written"]
    assert _files(tmp_path) == ["in.onnx"]
