"""``onnxprune bench --provider cuda --cuda-graph / --nhwc`` and feeds of each input's own type.

No GPU is needed: the CUDA sessions are fakes (``fake_cuda``) standing in for
``onnxruntime.InferenceSession`` — the constructor ``runtime.create_session`` calls — that record
the provider options and the IOBinding calls. What ORT does with the options on a real GPU is
not tested here; what onnxprune asks of it is.
"""

import json
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper

import onnxprune.checks.bench as bench
import onnxprune.ir.model_io as model_io
from graphs import vgg
from onnxprune.checks.bench import Settings
from onnxprune.cli import main as cli_main
from onnxprune.commands.bench import BenchCommand, build_parser
from onnxprune.errors import UserError

CUDA = "CUDAExecutionProvider"


def _one_error_line(capsys, argv, fragment):
    """``onnxprune argv`` exits 2 with one stderr line holding ``fragment``; that line."""
    assert cli_main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("onnxprune bench: error: ") and fragment in err[0], err
    return err[0]


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(vgg().model(), path)
    return path


# -- options ----------------------------------------------------------------------------------

def test_flags_reach_settings():
    parse = build_parser().parse_args
    on = BenchCommand.from_args(parse(["a.onnx", "--provider", "cuda", "--cuda-graph", "--nhwc"])).settings
    assert on.cuda_graph and on.prefer_nhwc and on.provider == "cuda" and not on.host_io
    off = BenchCommand.from_args(parse(["a.onnx", "--provider", "cuda"])).settings
    assert not off.cuda_graph and not off.prefer_nhwc


@pytest.mark.parametrize("extra, fragment", [
    (["--cuda-graph"], "--cuda-graph is an option of the CUDA provider"),
    (["--nhwc"], "--nhwc is an option of the CUDA provider"),
    (["--provider", "cpu", "--nhwc", "--cuda-graph"], "use it with --provider cuda"),
    (["--provider", "cuda", "--cuda-graph", "--host-io"], "cannot time --host-io"),
])
def test_bad_combinations_exit_2_before_any_work(model_file, capsys, monkeypatch, extra, fragment):
    def fail(*args, **kwargs):
        raise AssertionError("work started before the options were checked")
    monkeypatch.setattr(model_io, "load_model", fail)
    monkeypatch.setattr(bench, "compare", fail)
    _one_error_line(capsys, ["bench", model_file, *extra], fragment)


def test_compare_checks_the_settings_too():
    """The library entry refuses what the command refuses (Python callers get no silent mis-timing)."""
    with pytest.raises(UserError, match="--host-io"):
        bench.compare([vgg().model()], ["m"], [1], Settings("cuda", cuda_graph=True, host_io=True))


# -- fake CUDA sessions -----------------------------------------------------------------------

class FakeBinding:
    def __init__(self):
        self.calls = []
        self.runs = 0

    def bind_ortvalue_input(self, name, value):
        self.calls.append(("input", name, value))

    def bind_output(self, name, device):
        self.calls.append(("output", name, device))


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA looks available; every session opened is a ``Fake`` (a fresh class per test), which
    records its providers and options and reports ``Fake.reported`` from get_providers()."""

    class Fake:
        made = []
        reported = [CUDA, "CPUExecutionProvider"]
        refuse = None  # an exception the constructor raises, as ORT does for a model it refuses
        capture_error = None  # an exception the first run_with_iobinding raises

        def __init__(self, source, options, providers):
            if Fake.refuse:
                raise Fake.refuse
            self.options, self.providers, self.bindings, self.runs = options, providers, [], 0
            Fake.made.append(self)

        def get_providers(self):
            return list(Fake.reported)

        def get_outputs(self):
            return [SimpleNamespace(name="y")]

        def io_binding(self):
            self.bindings.append(FakeBinding())
            return self.bindings[-1]

        def run_with_iobinding(self, binding):
            if Fake.capture_error and not self.runs:
                raise Fake.capture_error
            self.runs += 1
            binding.runs += 1

        def run(self, names, feeds):
            self.runs += 1
            return [np.zeros(1, np.float32)]

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CUDA, "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", Fake)
    # device buffers: a tagged copy of the array, so a test can see which array went where
    monkeypatch.setattr(onnxruntime.OrtValue, "ortvalue_from_numpy",
                        staticmethod(lambda value, device, index: ("ortvalue", device, index, value.copy())))
    return Fake


def test_provider_options_are_passed_as_strings(fake_cuda):
    model = vgg().model()
    bench.make_session(model, Settings("cuda", 1, "HEURISTIC", cuda_graph=True, prefer_nhwc=True))
    bench.make_session(model, Settings("cuda", 1))
    on, off = fake_cuda.made
    assert on.providers == [(CUDA, {"cudnn_conv_algo_search": "HEURISTIC", "enable_cuda_graph": "1",
                                    "prefer_nhwc": "1"}), "CPUExecutionProvider"]
    assert off.providers[0] == (CUDA, {"cudnn_conv_algo_search": "EXHAUSTIVE", "enable_cuda_graph": "0",
                                       "prefer_nhwc": "0"})
    assert all(type(v) is str for v in on.providers[0][1].values())
    assert on.options.intra_op_num_threads == 1  # the fixed settings still come from create_session


def test_graph_runner_binds_once_and_captures_before_timing(fake_cuda):
    sess = fake_cuda(b"", None, [])
    feeds = {"input": np.ones((1, 3, 8, 8), np.float32), "other": np.zeros(2, np.int64)}
    run = bench.runner(sess, feeds, Settings("cuda", cuda_graph=True), "m.onnx")
    assert len(sess.bindings) == 1 and sess.runs == 1  # bound, then the capture run, before any timing
    binding = sess.bindings[0]
    bound = list(binding.calls)
    assert [c[:2] for c in bound] == [("input", "input"), ("input", "other"), ("output", "y")]
    assert all(c[2][1] == "cuda" for c in bound if c[0] == "input") and bound[-1][2] == "cuda"
    np.testing.assert_array_equal(bound[1][2][3], feeds["other"])
    for _ in range(3):
        assert run() is binding
    assert binding.calls == bound and len(sess.bindings) == 1  # replays: the same buffers, never rebound
    assert binding.runs == 4
    assert set(run.inputs) == {"input", "other"}  # the input buffers live as long as the runner


def test_without_graph_nothing_runs_before_timing(fake_cuda):
    sess = fake_cuda(b"", None, [])
    bench.runner(sess, {"input": np.ones(2, np.float32)}, Settings("cuda"))
    assert len(sess.bindings) == 1 and sess.runs == 0


def test_capture_failure_is_one_line_naming_the_model(fake_cuda):
    fake_cuda.capture_error = RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Graph capture did not complete\nstack")
    sess = fake_cuda(b"", None, [])
    with pytest.raises(UserError) as info:
        bench.runner(sess, {"input": np.ones(2, np.float32)}, Settings("cuda", cuda_graph=True), "net.onnx")
    message = str(info.value)
    assert message.startswith("net.onnx: the CUDA graph capture failed") and "Graph capture did not complete" in message
    assert "\n" not in message and "stack" not in message


def test_cpu_fallback_with_cuda_graph_is_one_line_naming_the_model(fake_cuda, model_file, capsys):
    fake_cuda.reported = ["CPUExecutionProvider"]
    line = _one_error_line(capsys, ["bench", model_file, "--provider", "cuda", "--cuda-graph"], str(model_file))
    assert "--cuda-graph" in line and "CPUExecutionProvider" in line


def test_ort_refusing_the_graph_is_one_line_naming_the_model(fake_cuda, tmp_path, capsys):
    fake_cuda.refuse = RuntimeError("[ONNXRuntimeError] : 1 : FAIL : This session cannot use the graph capture "
                                    "feature as requested by the user  as all compute graph nodes have not been "
                                    "partitioned to the CUDAExecutionProvider\nmore")
    path = tmp_path / "odd {name}.onnx"  # braces in a path must not break the message template
    onnx.save(vgg().model(), path)
    line = _one_error_line(capsys, ["bench", path, "--provider", "cuda", "--cuda-graph"], "partitioned")
    assert str(path) in line and "cannot be run as a CUDA graph" in line and "more" not in line


def test_capture_failure_through_the_command_exits_2(fake_cuda, model_file, capsys):
    fake_cuda.capture_error = RuntimeError("capture broke")
    line = _one_error_line(capsys, ["bench", model_file, "--provider", "cuda", "--cuda-graph"], "capture broke")
    assert str(model_file) in line


def test_report_names_every_cuda_setting_and_graph_mode_opens_sessions_per_batch(fake_cuda, model_file,
                                                                               tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["bench", model_file, model_file, "--provider", "cuda", "--cuda-graph", "--nhwc", "--batch", "1,2",
            "--repeat", "2", "--warmup", "0", "--threads", "1", "--json", out]
    assert cli_main([str(a) for a in argv]) == 0
    text = capsys.readouterr().out
    assert "cudnn_conv_algo_search=EXHAUSTIVE, cuda_graph=on, prefer_nhwc=on" in text
    assert "one CUDA graph replay per run" in text
    settings = json.loads(out.read_text())["settings"]
    assert settings["cuda_graph"] is True and settings["prefer_nhwc"] is True
    # a captured graph holds one shape: 2 models x 2 batches, each session captured once (3 runs)
    assert len(fake_cuda.made) == 4 and [s.runs for s in fake_cuda.made] == [3, 3, 3, 3]

    fake_cuda.made.clear()
    assert cli_main([str(a) for a in argv if a not in ("--cuda-graph", "--nhwc")]) == 0
    assert "cuda_graph=off, prefer_nhwc=off" in capsys.readouterr().out
    assert len(fake_cuda.made) == 2  # without graphs one session per model serves every batch


def test_cuda_settings_stay_out_of_cpu_reports():
    data = Settings("cpu", 1).as_dict()
    assert not {"cuda_graph", "prefer_nhwc", "cudnn_conv_algo_search", "io"} & set(data)
    cuda = Settings("cuda", 1, prefer_nhwc=True).as_dict()
    assert cuda["prefer_nhwc"] is True and cuda["cuda_graph"] is False and "graph" not in cuda["io"]


# -- feeds of each input's own type -----------------------------------------------------------

def _mixed_precision_model():
    """y16 = x16 + x16 (a float16 input), y32 = Identity(x32) (float32, as ``--precision fp16``
    keeps), n = Identity(ids) (int64)."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x16", "x16"], ["y16"]), helper.make_node("Identity", ["x32"], ["y32"]),
         helper.make_node("Identity", ["ids"], ["n"])], "mixed",
        [helper.make_tensor_value_info("x16", TensorProto.FLOAT16, ["N", 3, 4, 4]),
         helper.make_tensor_value_info("x32", TensorProto.FLOAT, ["N", 5]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y16", TensorProto.FLOAT16, ["N", 3, 4, 4]),
         helper.make_tensor_value_info("y32", TensorProto.FLOAT, ["N", 5]),
         helper.make_tensor_value_info("n", TensorProto.INT64, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_make_feeds_uses_each_inputs_element_type_and_runs_on_cpu():
    model = _mixed_precision_model()
    feeds = bench.make_feeds(model, batch=2)
    assert {k: (v.dtype, v.shape) for k, v in feeds.items()} == {
        "x16": (np.float16, (2, 3, 4, 4)), "x32": (np.float32, (2, 5)), "ids": (np.int64, (2,))}
    assert np.abs(feeds["x16"]).max() > 0  # random, not zeros
    settings = Settings("cpu", 1)
    y16, y32, n = bench.runner(bench.make_session(model, settings), feeds, settings)()
    assert y16.dtype == np.float16 and y32.dtype == np.float32
    np.testing.assert_array_equal(y16, feeds["x16"] + feeds["x16"])
    np.testing.assert_array_equal(y32, feeds["x32"])


def test_bench_times_an_fp16_input_model(tmp_path, capsys):
    path = tmp_path / "half.onnx"
    onnx.save(_mixed_precision_model(), path)
    assert cli_main(["bench", str(path), "--batch", "1,3", "--repeat", "1", "--warmup", "0", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert f"| {path} | 1 |" in out and f"| {path} | 3 |" in out
