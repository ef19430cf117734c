"""``onnxprune bench`` and ``check_speed``: interleaving, statistics, report fields, error exits.

No assertion here depends on how fast anything runs (shared machines are noisy).
"""

import json

import numpy as np
import pytest

import onnxprune.checks.bench as bench
from graphs import vgg
from onnxprune.checks.bench import Settings, compare, interleave, paired_ratio, summarize
from onnxprune.cli import main as cli_main


def test_interleave_rotates_order_and_skips_warmup():
    calls = []
    runners = [lambda i=i: calls.append(i) for i in range(3)]
    ticks = iter(range(1000))
    samples = interleave(runners, repeat=4, warmup=2, clock=lambda: next(ticks))
    assert calls[:6] == [0, 1, 2, 0, 1, 2]  # warm-up
    assert calls[6:] == [0, 1, 2, 1, 2, 0, 2, 0, 1, 0, 1, 2]
    timed = calls[6:]
    assert all(a != b for a, b in zip(timed, timed[1:]))  # no model runs twice in a row
    assert [len(s) for s in samples] == [4, 4, 4]
    assert all(x == 1 for s in samples for x in s)  # each run timed by consecutive clock reads


def test_summarize():
    stats = summarize([0.001 * v for v in range(1, 11)])
    assert stats == {"median_ms": 5.5, "p90_ms": pytest.approx(9.1), "min_ms": 1.0, "runs": 10}


def test_paired_ratio_cancels_a_load_step_that_the_ratio_of_medians_does_not():
    """B is 0.9x A in every round; the machine gets 3x slower in the middle of round 20, between
    A's run and B's. A then has 21 fast runs of 41 and B 20: their medians fall on different
    loads and the ratio of medians says B is 2.7x *slower*; the per-round ratio is not fooled."""
    rng = np.random.default_rng(1)
    a = np.r_[np.full(21, 10.0), np.full(20, 30.0)] * (1 + 0.01 * rng.standard_normal(41))
    b = 0.9 * np.r_[np.full(20, 10.0), np.full(21, 30.0)] * (1 + 0.01 * rng.standard_normal(41))
    assert np.median(b) / np.median(a) > 2.5
    got = paired_ratio(b, a)
    low, high = got["paired_ratio_ci95"]
    assert low <= got["paired_ratio"] <= high and 0.88 < low and high < 0.92
    assert paired_ratio(b, a) == got  # fixed seed: the same timings give the same report


def test_paired_ratio_interval_covers_no_difference_and_narrows_with_rounds():
    """Identical models with 5% noise per run: the 95% interval contains 1.0 in about 95% of
    repeated experiments, and it narrows as rounds are added."""
    rng = np.random.default_rng(2)
    covered, widths = 0, {10: [], 40: [], 160: []}
    for trial in range(100):
        for rounds in widths:
            a, b = (10.0 * np.exp(0.05 * rng.standard_normal(rounds)) for _ in range(2))
            low, high = paired_ratio(b, a, resamples=500, seed=trial)["paired_ratio_ci95"]
            widths[rounds].append(high - low)
            covered += rounds == 40 and low <= 1.0 <= high
    assert 85 <= covered <= 99
    assert np.median(widths[10]) > np.median(widths[40]) > np.median(widths[160])
    a = 10.0 * np.exp(0.05 * rng.standard_normal(20))
    assert paired_ratio(0.8 * a, a)["paired_ratio_ci95"] == [0.8, 0.8]


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
        assert "paired_ratio" not in first
        low, high = second["paired_ratio_ci95"]
        assert low <= second["paired_ratio"] <= high
    assert "intra_op_num_threads=1" in bench.format_report(report)


def test_fixed_batch_models_run_at_their_batch():
    model = vgg(batch=3).model()
    report = compare([model], ["fixed"], [1, 8], Settings("cpu", 1), repeat=1, warmup=0)
    assert [r["rows"][0]["batch"] for r in report["results"]] == [3]
    # its MACs are a batch of 3's, and the table says so (it read "MACs (batch 1)")
    assert report["models"][0]["macs"] == 3 * vgg().macs()
    assert f"| {report['models'][0]['macs'] / 1e9:.3f} G (batch 3) |" in bench.format_report(report)


def test_main_prints_table_and_writes_json(model_files, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", *map(str, model_files), "--batch", "1", "--repeat", "2", "--warmup", "0", "--threads", "1",
            "--json", str(out)]
    assert cli_main(argv) == 0
    text = capsys.readouterr().out
    assert "ORT_ENABLE_ALL" in text and "| median ms |" in text and "paired ratio (95% interval)" in text
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


def test_check_speed_judges_by_the_per_round_ratio(monkeypatch):
    """A pruned model 0.9x the original in every round, timed through a 3x load step that lands
    between the two runs of one round: the ratio of medians would fail it (1.35), the per-round
    ratio passes it and both are reported."""
    model = vgg().model()
    calls = []

    def fake(runners, repeat, warmup=3, clock=None):
        start = sum(calls)
        calls.append(repeat)
        load = [1.0 if start + r < 20 else 3.0 for r in range(repeat)]
        original = [10e-3 * x for x in load]
        pruned = [9e-3 * (3.0 if start + r == 19 else x) for r, x in enumerate(load)]
        return [original, pruned]

    monkeypatch.setattr(bench, "interleave", fake)
    result = bench.check_speed(model, model, min_rounds=40, min_seconds=0)
    assert result["passed"] and result["ratio"] == pytest.approx(0.9)
    assert result["ratio_ci95"][0] <= 0.9 <= result["ratio_ci95"][1]
    assert result["ratio_of_medians"] == pytest.approx(1.35)


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
