"""The cost model fitted to whole-model latencies (onnxprune/planning/cost_fit.py)."""

from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune.planning import cost_fit
from onnxprune.planning.cost_fit import FEATURES, FittedModel, Sample, conv_features
from onnxprune.planning.latency import ConvOp
from onnxprune.planning.speed_plan import collect_layers

ROOT = Path(__file__).resolve().parents[1]
RECORDED = sorted((ROOT / "benchmarks" / "results" / "cost_fit").glob("*.json"))


def _op(rng) -> ConvOp:
    """A random Conv of one of the five classes the model tells apart."""
    kind = rng.integers(5)
    c = int(16 * rng.integers(1, 9))
    hw = int(rng.choice([7, 14, 28]))
    if kind == 0:
        return ConvOp(c, int(16 * rng.integers(1, 9)), 1, (1, 1), (1, 1), hw, hw)
    if kind == 1:
        return ConvOp(c, int(16 * rng.integers(1, 9)), 1, (3, 3), (1, 1), hw, hw)
    if kind == 2:
        return ConvOp(c + 3, c, 1, (1, 1), (1, 1), hw, hw)  # off the 16-channel block
    if kind == 3:
        return ConvOp(c, c, c, (3, 3), (1, 1), hw, hw)  # depthwise
    return ConvOp(2 * c, 2 * c, 2, (3, 3), (1, 1), hw, hw)  # grouped


def test_fit_recovers_the_coefficients_and_rests_that_made_the_latencies():
    rng = np.random.default_rng(0)
    truth = np.array([5.0, 1.4e-5, 1.3e-5, 2.0e-5, 6e-5, 2e-5, 2e-4])
    rests = {("a", 1): 300.0, ("b", 1): 900.0}
    samples = []
    for family, batch in rests:
        for i in range(30):
            ops = tuple(_op(rng) for _ in range(int(rng.integers(4, 12))))
            us = sum(conv_features(op) @ truth for op in ops) + rests[(family, batch)]
            samples.append(Sample(family, batch, ops, us / 1e3, f"{family}{i}"))
    result = cost_fit.fit(samples)
    assert np.allclose(result.coefficients, truth, rtol=1e-6)
    assert result.rests == pytest.approx(rests, rel=1e-6)
    assert FittedModel("cpu", result.coefficients).conv_us(samples[0].ops[0]) == \
        pytest.approx(conv_features(samples[0].ops[0]) @ truth, rel=1e-6)


def test_features_put_each_conv_in_one_class():
    rng = np.random.default_rng(1)
    for _ in range(50):
        op = _op(rng)
        row = conv_features(op)
        assert row[FEATURES.index("overhead")] == 1
        assert np.count_nonzero(row[1:6]) == 1
        assert row[FEATURES.index("output_elements")] == op.c_out * op.h_out * op.w_out


@pytest.mark.skipif(not RECORDED, reason="recorded samples not in this checkout")
def test_recorded_samples_fit_and_rank_held_out_networks():
    """Fitted on three networks, the model ranks the fourth's pruned variants by latency
    (Spearman >= 0.9 at batch 1 and 8) and predicts the ResNets' speedups closer than the
    analytical model with its scale fitted the same way."""
    samples, dense = cost_fit.load_samples(RECORDED)
    assert set(dense) == {"resnet18", "resnet50", "mobilenet_v2", "efficientnet_lite0"}
    first, second = cost_fit.fit(samples), cost_fit.fit(samples)
    assert first.coefficients == second.coefficients  # deterministic
    assert min(first.coefficients) >= 0
    report = cost_fit.validate(samples, dense)
    assert len(report) == 8
    for key, row in report.items():
        assert row["fitted"]["spearman"] >= 0.9, key
        if key.startswith("resnet"):
            assert row["fitted"]["median_abs_speedup_error"] < row["analytical"]["median_abs_speedup_error"], key


def test_model_conv_ops_are_the_planners_layers():
    model = onnx.load(ROOT / "samples" / "resnet20.onnx")

    class Config:
        min_channels, exclude = 1, ()

    layers, _, _ = collect_layers(model, Config())
    ops = cost_fit.model_conv_ops(model, batch=4)
    assert len(ops) == len(layers)
    for op, layer in zip(ops, layers.values()):
        assert (op.c_in, op.c_out, op.groups, op.kernel, op.h_out) == \
            (layer.c_in, layer.c_out, layer.groups, layer.kernel, layer.h_out)
        assert op.batch == 4


def test_recorded_ops_must_be_convs():
    with pytest.raises(ValueError, match="conv key"):
        cost_fit.ops_from_keys(["conv:16-16-g1-k1x1-s1x1-o7x7-b1", "gather:64-16-8x8-b1"])
