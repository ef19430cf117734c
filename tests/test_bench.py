"""``onnxprune bench`` and ``check_speed``: interleaving, statistics, report fields, error exits.

No assertion here depends on how fast anything runs (shared machines are noisy).
"""

import json

import pytest

import onnxprune.checks.bench as bench
from graphs import vgg
from onnxprune.checks.bench import Settings, compare, interleave, summarize
from onnxprune.cli import main as cli_main


def test_interleave_alternates_order_and_skips_warmup():
    calls = []
    runners = [lambda i=i: calls.append(i) for i in range(3)]
    ticks = iter(range(1000))
    samples = interleave(runners, repeat=4, warmup=2, clock=lambda: next(ticks))
    assert calls[:6] == [0, 1, 2, 0, 1, 2]  # warm-up
    assert calls[6:] == [0, 1, 2, 2, 1, 0, 0, 1, 2, 2, 1, 0]
    assert [len(s) for s in samples] == [4, 4, 4]
    assert all(x == 1 for s in samples for x in s)  # each run timed by consecutive clock reads


def test_summarize():
    stats = summarize([0.001 * v for v in range(1, 11)])
    assert stats == {"median_ms": 5.5, "p90_ms": pytest.approx(9.1), "min_ms": 1.0, "runs": 10}


@pytest.fixture
def model_files(tmp_path):
    import onnx

    paths = []
    for seed in (0, 1):
        path = tmp_path / f"m{seed}.onnx"
        onnx.save(vgg(seed=seed).model(), path)
        paths.append(path)
    return paths


def test_compare_report_fields(model_files):
    import onnx

    models = [onnx.load(p) for p in model_files]
    report = compare(models, ["a", "b"], [1, 2], Settings("cpu", 1), repeat=2, warmup=1)
    assert report["settings"]["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert report["settings"]["intra_op_num_threads"] == 1
    assert [m["model"] for m in report["models"]] == ["a", "b"]
    assert all(m["macs"] > 0 and m["params"] > 0 and m["fixed_batch"] is None for m in report["models"])
    assert [r["batch"] for r in report["results"]] == [1, 2]
    for result in report["results"]:
        first, second = result["rows"]
        assert first["ratio_to_first"] == 1.0 and first["runs"] == 2
        assert second["ratio_to_first"] == pytest.approx(second["median_ms"] / first["median_ms"], rel=1e-3)
        assert {"median_ms", "p90_ms", "speedup_vs_first", "batch"} <= set(second)
    assert "intra_op_num_threads=1" in bench.format_report(report)


def test_fixed_batch_models_run_at_their_batch():
    model = vgg(batch=3).model()
    report = compare([model], ["fixed"], [1, 8], Settings("cpu", 1), repeat=1, warmup=0)
    assert [r["rows"][0]["batch"] for r in report["results"]] == [3]


def test_main_prints_table_and_writes_json(model_files, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", *map(str, model_files), "--batch", "1", "--repeat", "2", "--warmup", "0", "--threads", "1",
            "--json", str(out)]
    assert cli_main(argv) == 0
    text = capsys.readouterr().out
    assert "ORT_ENABLE_ALL" in text and "| median ms |" in text
    assert json.loads(out.read_text())["results"][0]["rows"][1]["model"] == str(model_files[1])


@pytest.mark.parametrize("extra, fragment", [([], "no such file"), (["--batch", "x"], "--batch")])
def test_errors_exit_2_with_one_line(model_files, tmp_path, capsys, extra, fragment):
    argv = ["bench", str(model_files[0]), str(tmp_path / "missing.onnx"), *extra]
    if extra:
        argv = ["bench", str(model_files[0]), *extra]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]


def test_autotune_missing_model_exits_2(tmp_path, capsys):
    assert cli_main(["autotune", str(tmp_path / "missing.onnx")]) == 2
    assert "no such file" in capsys.readouterr().err


def _fake_interleave(original_ms, pruned_ms):
    def fake(runners, repeat, warmup=3, clock=None):
        return [[original_ms / 1e3] * repeat, [pruned_ms / 1e3] * repeat]
    return fake


def test_check_speed_passes_faster_and_equal_models(monkeypatch):
    model = vgg().model()
    monkeypatch.setattr(bench, "interleave", _fake_interleave(10.0, 7.0))
    result = bench.check_speed(model, model, min_seconds=0)
    assert result["ratio"] == pytest.approx(0.7) and result["speedup"] == pytest.approx(1 / 0.7, rel=1e-3)
    assert result["rounds"] >= 20
    json.dumps(result)
    monkeypatch.setattr(bench, "interleave", _fake_interleave(10.0, 10.1))
    assert bench.check_speed(model, model, min_seconds=0)["ratio"] == pytest.approx(1.01)


def test_check_speed_raises_when_slower(monkeypatch):
    model = vgg().model()
    monkeypatch.setattr(bench, "interleave", _fake_interleave(10.0, 11.0))
    with pytest.raises(RuntimeError, match="slower than the input"):
        bench.check_speed(model, model, min_seconds=0)


def test_device_bound_runner_computes_what_run_computes():
    """The IOBinding path CUDA timing uses (exercised here on the CPU device) runs the same model."""
    import numpy as np

    model = vgg().model()
    settings = Settings("cpu")
    sess = bench.make_session(model, settings)
    feeds = bench.make_feeds(model, 2)
    binding = bench.device_runner(sess, feeds, "cpu")()
    np.testing.assert_allclose(binding.copy_outputs_to_cpu()[0], sess.run(None, feeds)[0], rtol=1e-5, atol=1e-6)
    # CPU timing keeps plain run(); only CUDA binds (unless host_io)
    assert isinstance(bench.runner(sess, feeds, settings)(), list)
    assert "io" not in settings.as_dict() and "io" in Settings("cuda").as_dict()
