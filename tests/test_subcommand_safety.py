"""Issue 12 for the subcommands (bench, eval, autotune) and latency tables: an output is never an
input, outputs go to a writable folder and appear atomically, and every refusal is one line on
stderr with exit status 2, before any work."""

import errno
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune.checks.autotune as autotune
import onnxprune.checks.bench as bench
import onnxprune.commands.eval as ev  # the eval command: its default data and its use of evaluate()
import onnxprune.ir.model_io as model_io
from graphs import vgg
from onnxprune.cli import main
from onnxprune.errors import UserError
from onnxprune.planning.latency import TABLE_FORMAT, TABLE_VERSION, AnalyticalModel, MeasuredTable, load_cost_model


def _digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _refused(capsys, argv, fragment, prog):
    """``onnxprune argv`` exits 2 with exactly one stderr line, from ``prog``, holding ``fragment``."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: ") and fragment in err[0], err
    return err[0]


def _no_work(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("work started before the paths were checked")
    monkeypatch.setattr(model_io, "load_model", fail)
    monkeypatch.setattr(bench, "compare", fail)
    monkeypatch.setattr(autotune, "autotune", fail)
    monkeypatch.setattr(ev, "evaluate", fail)


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(vgg().model(), path)
    return path


def _alias(tmp_path, target, how):
    if how == "same":
        return target
    alias = tmp_path / f"alias-{how}{target.suffix}"
    if how == "symlink":
        alias.symlink_to(target)
    else:
        os.link(target, alias)
    return alias


# -- bench ------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["same", "symlink", "hardlink"])
@pytest.mark.parametrize("which", [0, 1])
def test_bench_json_over_a_model_is_refused(tmp_path, model_path, how, which, capsys, monkeypatch):
    _no_work(monkeypatch)
    other = tmp_path / "b.onnx"
    other.write_bytes(model_path.read_bytes())
    models = [model_path, other]
    before = [_digest(m) for m in models]
    _refused(capsys, ["bench", *models, "--json", _alias(tmp_path, models[which], how)], "must differ",
             "onnxprune bench")
    assert [_digest(m) for m in models] == before


@pytest.mark.parametrize("target, fragment", [("missing/b.json", "does not exist"), ("folder", "is a folder")])
def test_bench_unwritable_json_is_refused_before_work(tmp_path, model_path, target, fragment, capsys, monkeypatch):
    _no_work(monkeypatch)
    (tmp_path / "folder").mkdir()
    _refused(capsys, ["bench", model_path, "--json", tmp_path / target], fragment, "onnxprune bench")


@pytest.mark.parametrize("argv, fragment", [(["autotune", ""], "MODEL.onnx is empty"),
                                            (["eval", ""], "MODEL.onnx is empty"),
                                            (["eval", "{m}", "--reference", ""], "--reference is empty"),
                                            (["eval", "{m}", "--data", ""], "--data is empty")])
def test_an_empty_input_path_of_a_subcommand_is_refused(model_path, argv, fragment, capsys, monkeypatch):
    _no_work(monkeypatch)
    argv = [str(model_path) if a == "{m}" else a for a in argv]
    _refused(capsys, argv, fragment, f"onnxprune {argv[0]}")


@pytest.mark.parametrize("command, option", [("bench", "--json"), ("eval", "--json"), ("autotune", "--out")])
def test_an_empty_output_path_is_refused_before_work(tmp_path, model_path, command, option, capsys, monkeypatch):
    _no_work(monkeypatch)
    _refused(capsys, [command, model_path, option, ""], f"{option} is empty", f"onnxprune {command}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def _flatten_head(path):
    """input N x 3 x H x W -> Conv 3->4 -> Flatten -> Gemm sized for 8x8 maps: runs only at 8x8."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["c"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1)]
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((5, 4 * 8 * 8)).astype(np.float32), "fc")]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                            ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_bench_of_a_model_that_cannot_run_at_the_default_size_says_what_to_do(tmp_path, capsys):
    path = _flatten_head(tmp_path / "head.onnx")
    line = _refused(capsys, ["bench", path, "--repeat", "1", "--warmup", "0"], "cannot run it at x=1x3x224x224",
                    "onnxprune bench")
    assert "--input-shape" in line
    assert main(["bench", str(path), "--repeat", "2", "--warmup", "0", "--input-shape", "1x3x8x8",
                 "--json", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["results"][0]["rows"][0]["runs"] == 2
    _refused(capsys, ["bench", path, "--input-shape", "images=1x3x8x8"], "no input 'images'", "onnxprune bench")
    _refused(capsys, ["bench", path, "--input-shape", "1x3x8x8", "--input-shape", "1x3x16x16"], "one size per input",
             "onnxprune bench")
    # the size given, nothing left to guess: no advice to give it again
    line = _refused(capsys, ["bench", path, "--input-shape", "1x3x9x9", "--repeat", "1", "--warmup", "0"],
                    "cannot run it at x=1x3x9x9", "onnxprune bench")
    assert "--input-shape" not in line


def test_bench_of_a_model_that_fails_only_at_a_larger_batch_names_the_batch(tmp_path, capsys):
    path = _flatten_head(tmp_path / "head.onnx")
    model = onnx.load(path)
    model.graph.node[1].CopyFrom(helper.make_node("Reshape", ["c", "one_row"], ["f"]))  # hard-codes batch 1
    model.graph.initializer.append(numpy_helper.from_array(np.array([1, -1], np.int64), "one_row"))
    onnx.save(model, path)
    line = _refused(capsys, ["bench", path, "--input-shape", "1x3x8x8", "--batch", "1,4", "--repeat", "1",
                             "--warmup", "0"], "x=4x3x8x8", "onnxprune bench")
    assert line.endswith("(at batch 4; try --batch 1)")


def test_autotune_measures_at_the_given_input_shape(tmp_path, capsys, monkeypatch):
    """The planner's ops are timed at the shapes pruning with the same --input-shape plans for
    (was: always 224, so a model used at 8x8 got a table the planner never looks up)."""
    measured = []
    monkeypatch.setattr(autotune, "measure_op", lambda op, settings, repeat=10: measured.append(op.key) or 1.0)
    wide = tmp_path / "wide.onnx"  # 16 filters: prunable, unlike _flatten_head's 4
    model = onnx.load(_flatten_head(tmp_path / "head.onnx"))
    rng = np.random.default_rng(1)
    model.graph.node.insert(1, helper.make_node("Conv", ["c0", "w2"], ["c"], pads=[1, 1, 1, 1]))
    model.graph.node[0].output[0] = "c0"
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(rng.standard_normal((32, 3, 3, 3)).astype(np.float32),
                                                                "w"))
    model.graph.initializer.append(numpy_helper.from_array(rng.standard_normal((4, 32, 3, 3)).astype(np.float32),
                                                           "w2"))
    onnx.save(model, wide)
    assert main(["autotune", str(wide), "--input-shape", "1x3x8x8", "--out", str(tmp_path / "t.json")]) == 0
    assert measured and all("-o8x8-" in key for key in measured if key.startswith("conv:"))
    measured.clear()
    assert main(["autotune", str(wide), "--out", str(tmp_path / "t224.json")]) == 0
    assert all("-o224x224-" in key for key in measured if key.startswith("conv:"))
    assert "symbolic dims set to 224 by default" in capsys.readouterr().err
    _refused(capsys, ["autotune", wide, "--input-shape", "1x3x8x8", "--input-shape", "1x3x16x16"],
             "one size per input", "onnxprune autotune")


def test_bench_counts_macs_at_the_size_it_times(tmp_path, capsys):
    path = _flatten_head(tmp_path / "head.onnx")
    assert main(["bench", str(path), "--input-shape", "1x3x8x8", "--repeat", "1", "--warmup", "0",
                 "--json", str(tmp_path / "b.json")]) == 0
    stats = json.loads((tmp_path / "b.json").read_text())["models"][0]
    assert stats["input_shapes"] == "x=Nx3x8x8"
    assert stats["macs"] == 4 * 3 * 9 * 8 * 8 + 5 * 4 * 8 * 8  # the Conv and the Gemm at 8x8, not 224x224
    assert "| x=Nx3x8x8 |" in capsys.readouterr().out


def test_eval_of_a_model_without_class_scores_is_refused(tmp_path, capsys):
    """A detector's map (or a time-major sequence) has no class per image: eval used to report
    0% agreement for identical maps, or crash."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "det", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [numpy_helper.from_array(rng.standard_normal((1, 1, 3, 3)).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "det.onnx")
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 255, (4, 1, 8, 8)).astype(np.uint8), labels=np.zeros(4, int))
    _refused(capsys, ["eval", tmp_path / "det.onnx", "--data", tmp_path / "d.npz"], "need class scores",
             "onnxprune eval")
    from onnxprune.checks.evaluate import predict_logits

    flat = helper.make_graph([helper.make_node("Flatten", ["x"], ["f"], axis=1),
                              helper.make_node("Unsqueeze", ["f", "one"], ["y"])], "cls",
                             [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 64])],
                             [numpy_helper.from_array(np.array([1], np.int64), "one")])
    scores = helper.make_model(flat, opset_imports=[helper.make_opsetid("", 17)])
    scores.ir_version = 8
    assert predict_logits(scores, np.zeros((3, 1, 8, 8), np.float32)).shape == (3, 64)  # N x 1 x C: class scores


def test_a_failed_run_is_one_line_on_the_process_stderr(tmp_path, capfd):
    """ORT logs a failed kernel on the process's own stderr (not sys.stderr): sessions log at
    fatal level only, so the command's one line is all the user sees."""
    path = _flatten_head(tmp_path / "head.onnx")
    assert main(["bench", str(path), "--repeat", "1", "--warmup", "0"]) == 2
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1 and "cannot run it" in err[0], err


@pytest.mark.parametrize("argv, fragment", [([], "required"), (["m.onnx", "--repeat", "x"], "--repeat"),
                                            (["m.onnx", "--provider", "tpu"], "--provider")])
def test_bench_usage_errors_are_one_line(argv, fragment, capsys):
    _refused(capsys, ["bench", *argv], fragment, "onnxprune bench")


# -- eval -------------------------------------------------------------------------------------

C = 4


@pytest.fixture
def tiny(tmp_path):
    """logits = Flatten(x) of N x 1 x 1 x 4 images, and 10 images of which 7 are right."""
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"], axis=1), helper.make_node("MatMul", ["f", "W"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 1, C])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", C])],
        [numpy_helper.from_array(np.eye(C, dtype=np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "tiny.onnx"
    onnx.save(model, path)
    images = np.full((10, 1, 1, C), 0.1, np.float32)
    images[np.arange(10), 0, 0, [0, 0, 1, 1, 2, 2, 3, 3, 0, 1]] = 0.9
    data = tmp_path / "d.npz"
    np.savez(data, images=images, labels=np.array([0, 0, 1, 1, 2, 2, 0, 1, 0, 3]))
    return path, data


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink"])
@pytest.mark.parametrize("which", ["model", "reference", "data"])
def test_eval_json_over_an_input_is_refused(tmp_path, tiny, how, which, capsys, monkeypatch):
    _no_work(monkeypatch)
    model, data = tiny
    reference = tmp_path / "ref.onnx"
    reference.write_bytes(model.read_bytes())
    target = {"model": model, "reference": reference, "data": data}[which]
    before = [_digest(p) for p in (model, reference, data)]
    _refused(capsys, ["eval", model, "--data", data, "--reference", reference,
                      "--json", _alias(tmp_path, target, how)], "must differ", "onnxprune eval")
    assert [_digest(p) for p in (model, reference, data)] == before


def test_eval_json_over_the_default_data_is_refused(tmp_path, tiny, capsys, monkeypatch):
    model, data = tiny
    monkeypatch.setattr(ev, "FMNIST_DIR", tmp_path / "no-fmnist")
    monkeypatch.setattr(ev, "SUBSET_PATH", data)
    _no_work(monkeypatch)
    _refused(capsys, ["eval", model, "--json", data], "must differ from the evaluation data", "onnxprune eval")


@pytest.mark.parametrize("target, fragment", [("missing/r.json", "does not exist"), ("folder", "is a folder")])
def test_eval_unwritable_json_is_refused_before_work(tmp_path, tiny, target, fragment, capsys, monkeypatch):
    _no_work(monkeypatch)
    (tmp_path / "folder").mkdir()
    model, data = tiny
    _refused(capsys, ["eval", model, "--data", data, "--json", tmp_path / target], fragment, "onnxprune eval")


def test_eval_json_is_written_atomically(tmp_path, tiny, capsys, monkeypatch):
    """A write that fails half-way (disk full) leaves the old file and no temporary file."""
    def full(text):
        def write(tmp):
            with open(tmp, "w") as f:
                f.write(text[:5])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write

    model, data = tiny
    out = tmp_path / "r.json"
    out.write_text("old")
    listing = sorted(os.listdir(tmp_path))
    monkeypatch.setattr(model_io, "text_writer", full)
    _refused(capsys, ["eval", model, "--data", data, "--json", out], "No space left", "onnxprune eval")
    assert out.read_text() == "old" and sorted(os.listdir(tmp_path)) == listing


def test_eval_json_gets_the_usual_mode(tmp_path, tiny, capsys):
    model, data = tiny
    out = tmp_path / "r.json"
    old = os.umask(0o022)
    try:
        assert main(["eval", str(model), "--data", str(data), "--json", str(out)]) == 0
    finally:
        os.umask(old)
    assert json.loads(out.read_text())["correct"] == 7 and out.stat().st_mode & 0o777 == 0o644


def _no_default_data(monkeypatch, tmp_path):
    monkeypatch.setattr(ev, "FMNIST_DIR", tmp_path / "no-fmnist")
    monkeypatch.setattr(ev, "SUBSET_PATH", tmp_path / "no-samples" / "fmnist_eval.npz")
    monkeypatch.setattr(ev, "LABELS_PATH", tmp_path / "no-samples" / "fmnist_labels.json")


def test_eval_with_data_needs_no_default_data(tmp_path, tiny, capsys, monkeypatch):
    _no_default_data(monkeypatch, tmp_path)
    model, data = tiny
    assert main(["eval", str(model), "--data", str(data)]) == 0
    assert "top-1:     70.00% (7/10)" in capsys.readouterr().out


@pytest.mark.parametrize("option", [[], ["--full"], ["--subset"]])
def test_eval_without_data_or_defaults_says_to_pass_data(tmp_path, tiny, option, capsys, monkeypatch):
    _no_default_data(monkeypatch, tmp_path)
    model, _ = tiny
    line = _refused(capsys, ["eval", model, *option], "pass --data X.npz", "onnxprune eval")
    if not option:
        assert "no evaluation data" in line


def test_eval_uses_a_patched_full_test_set(tmp_path, tiny, monkeypatch):
    """The default locations are looked up when used (a wheel install can point them elsewhere)."""
    import gzip

    folder = tmp_path / "fmnist"
    folder.mkdir()
    images = np.zeros((3, 2, 2), np.uint8)
    with gzip.open(folder / ev.FMNIST_TEST_IMAGES, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in images.shape) + images.tobytes())
    with gzip.open(folder / ev.FMNIST_TEST_LABELS, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + bytes([0, 1, 2]))
    monkeypatch.setattr(ev, "FMNIST_DIR", folder)
    assert ev.full_test_set_available()
    data = ev.load_dataset(None)
    assert data.images.shape == (3, 1, 2, 2) and "full" in data.description
    assert ev.data_files(None) == [folder / ev.FMNIST_TEST_IMAGES, folder / ev.FMNIST_TEST_LABELS]


def test_eval_from_an_installed_package_without_samples(tmp_path, tiny):
    """A wheel install: the package alone, no samples/ beside it, no system data set."""
    import shutil

    site = tmp_path / "site"
    shutil.copytree(Path(ev.__file__).parent.parent, site / "onnxprune", ignore=shutil.ignore_patterns("__pycache__"))
    model, data = tiny
    script = textwrap.dedent("""
        import sys
        import onnxprune.commands.eval as ev
        from onnxprune.cli import main
        assert not ev.SUBSET_PATH.exists(), ev.SUBSET_PATH
        ev.FMNIST_DIR = ev.FMNIST_DIR.parent / "onnxprune-test-no-such-folder"
        sys.exit(main(sys.argv[1:]))
    """)
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = lambda *argv: subprocess.run([sys.executable, "-c", script, "eval", str(model), *argv],  # noqa: E731
                                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    ok = run("--data", str(data))
    assert ok.returncode == 0 and "70.00%" in ok.stdout, ok.stderr
    missing = run()
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines() == [missing.stderr.strip()] and "--data" in missing.stderr


# -- autotune ---------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["same", "symlink", "hardlink"])
def test_autotune_out_over_the_model_is_refused(tmp_path, model_path, how, capsys, monkeypatch):
    _no_work(monkeypatch)
    before = _digest(model_path)
    _refused(capsys, ["autotune", model_path, "--out", _alias(tmp_path, model_path, how)], "must differ",
             "onnxprune autotune")
    assert _digest(model_path) == before


@pytest.mark.parametrize("target, fragment", [("missing/t.json", "does not exist"), ("folder", "is a folder")])
def test_autotune_unwritable_out_is_refused_before_work(tmp_path, model_path, target, fragment, capsys,
                                                        monkeypatch):
    _no_work(monkeypatch)
    (tmp_path / "folder").mkdir()
    _refused(capsys, ["autotune", model_path, "--out", tmp_path / target], fragment, "onnxprune autotune")


def test_autotune_bad_existing_table_is_refused_before_work(tmp_path, model_path, capsys, monkeypatch):
    _no_work(monkeypatch)
    out = tmp_path / "t.json"
    out.write_text(json.dumps({"format": TABLE_FORMAT, "version": TABLE_VERSION, "provider": "cpu",
                               "entries_us": []}))
    line = _refused(capsys, ["autotune", model_path, "--out", out], "entries_us", "onnxprune autotune")
    assert f"--out {out}" in line


def test_autotune_extends_its_table_in_place(tmp_path, model_path, capsys, monkeypatch):
    """--out may name an existing table: it is read, extended and replaced (atomically)."""
    out = tmp_path / "t.json"
    MeasuredTable("cpu", {"conv:16-16-g1-k3x3-s1x1-o8x8-b1": 5.0}).save(out)

    def fake(model, config, settings, repeat, max_seconds, table, log):
        table.entries["gather:16-8-8x8-b1"] = 1.0
        return table

    monkeypatch.setattr(autotune, "autotune", fake)
    assert main(["autotune", str(model_path), "--out", str(out)]) == 0
    assert len(MeasuredTable.load(out, "cpu").entries) == 2


@pytest.mark.parametrize("argv, fragment", [([], "required"), (["m.onnx", "--repeat", "x"], "--repeat")])
def test_autotune_usage_errors_are_one_line(argv, fragment, capsys):
    _refused(capsys, ["autotune", *argv], fragment, "onnxprune autotune")


# -- latency tables ---------------------------------------------------------------------------

def _table(tmp_path, **fields):
    data = {"format": TABLE_FORMAT, "version": TABLE_VERSION, "provider": "cpu", "meta": {},
            "entries_us": {"conv:16-16-g1-k3x3-s1x1-o8x8-b1": 12.5}}
    data.update(fields)
    path = tmp_path / "table.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("fields, fragment", [
    ({"entries_us": ["conv:16-16-g1-k3x3-s1x1-o8x8-b1", 12.5]}, "\"entries_us\" must be an object"),
    ({"entries_us": "fast"}, "\"entries_us\" must be an object"),
    ({"entries_us": {"conv:1": "12"}}, "entry 'conv:1' must be a finite number"),
    ({"entries_us": {"conv:1": None}}, "must be a finite number"),
    ({"entries_us": {"conv:1": True}}, "must be a finite number"),
    ({"entries_us": {"conv:1": float("nan")}}, "must be a finite number"),
    ({"entries_us": {"conv:1": float("inf")}}, "must be a finite number"),
    ({"entries_us": {"conv:1": -3}}, "must be a finite number"),
    ({"entries_us": {"conv:1": 10**400}}, "must be a finite number"),
    ({"entries_us": {"conv:1": [1]}}, "must be a finite number"),
    ({"provider": None}, "\"provider\" must be one of"),
    ({"provider": 3}, "\"provider\" must be one of"),
    ({"provider": "tpu"}, "\"provider\" must be one of"),
    ({"meta": ["a"]}, "\"meta\" must be an object"),
])
def test_malformed_latency_table_is_a_user_error(tmp_path, fields, fragment):
    path = _table(tmp_path, **fields)
    for load in (lambda: MeasuredTable.load(path), lambda: MeasuredTable.load(path, "cpu"),
                 lambda: load_cost_model("cpu", path)):
        with pytest.raises(UserError) as info:
            load()
        assert str(info.value).startswith(f"--latency-table {path}: ") and fragment in str(info.value)


def test_missing_provider_is_a_user_error_even_without_an_expected_one(tmp_path):
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"format": TABLE_FORMAT, "version": TABLE_VERSION, "entries_us": {}}))
    with pytest.raises(UserError, match="provider"):
        MeasuredTable.load(path)


def test_huge_integer_in_a_table_is_a_user_error(tmp_path):
    path = tmp_path / "table.json"
    path.write_text('{"format": "%s", "version": %d, "provider": "cpu", "entries_us": {"k": %s}}'
                    % (TABLE_FORMAT, TABLE_VERSION, "9" * 5000))
    with pytest.raises(UserError, match="--latency-table"):
        MeasuredTable.load(path)


def test_valid_table_round_trips(tmp_path):
    path = _table(tmp_path, entries_us={"conv:16-16-g1-k3x3-s1x1-o8x8-b1": 12.5, "gather:16-8-8x8-b1": 3})
    table = MeasuredTable.load(path, "cpu")
    assert table.entries == {"conv:16-16-g1-k3x3-s1x1-o8x8-b1": 12.5, "gather:16-8-8x8-b1": 3.0}
    assert table.provider == "cpu" and isinstance(load_cost_model("cpu", path), MeasuredTable)
    assert isinstance(load_cost_model("cpu", None), AnalyticalModel)
