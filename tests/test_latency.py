"""The cost model: fast-path rules, efficiency curve, Gather cost, measured-table I/O and fallback."""

import json

import pytest

from onnxprune.errors import UserError
from onnxprune.planning.latency import (AnalyticalModel, ConvOp, GatherOp, MeasuredTable, PROFILES, grouped_efficiency,
                               load_cost_model, on_fast_path, parse_key)

CPU = PROFILES["cpu"]


def conv(c_in=128, c_out=128, groups=1, k=3, hw=28):
    return ConvOp(c_in, c_out, groups, (k, k), (1, 1), hw, hw)


def test_fast_path_needs_block_aligned_channels_per_group():
    assert on_fast_path(conv(128, 128, 2), CPU)  # 64 in, 64 out per group
    assert not on_fast_path(conv(2 * 72, 128, 2), CPU)  # 72 kept channels per group
    assert not on_fast_path(conv(128, 8 * 24, 8), CPU)  # 24 filters per group
    assert on_fast_path(conv(3, 64), CPU)  # an RGB stem: fewer inputs than one block is fine
    assert not on_fast_path(conv(128, 40), CPU)


def test_efficiency_follows_the_measured_curve():
    assert grouped_efficiency(16, CPU) == pytest.approx(0.46)
    assert grouped_efficiency(64, CPU) == pytest.approx(0.88)
    values = [grouped_efficiency(f, CPU) for f in (8, 16, 24, 32, 48, 64, 128, 512)]
    assert values == sorted(values)


def test_analytical_costs_rank_like_the_notes():
    model = AnalyticalModel("cpu")
    dense = model.conv_us(conv(128, 128))
    g1 = model.conv_us(conv(64, 128))  # half the input channels
    g8 = model.conv_us(conv(8 * 64, 128, 8))  # same MACs, 16 filters per group
    unaligned = model.conv_us(conv(2 * 72, 128, 2))
    assert g1 < dense < g8
    assert unaligned > model.conv_us(conv(2 * 80, 128, 2))  # rounding C_keep up beats unaligned
    assert model.gather_us(GatherOp(128, 64, 28, 28)) > 0


def test_memory_bound_convs_cost_more_per_mac_on_cpu():
    """The traffic term: at equal MACs a 1x1 Conv on a 7x7 map with 2048 inputs (weights dominate)
    and a 1x1 Conv on a 56x56 map with 64 outputs (maps dominate) cost more than a 3x3 Conv on
    a 14x14 map, as measured in the graph (56-68 vs 75-82 GMAC/s); weights are amortised over
    the batch, maps are not. The CUDA profile charges only the maps (measured on an H100 at
    fp16 batch 128: time follows the activation maps), so there the large map costs most."""
    model = AnalyticalModel("cpu")
    three = ConvOp(256, 256, 1, (3, 3), (1, 1), 14, 14)
    wide = ConvOp(2048, 512, 1, (1, 1), (1, 1), 7, 7)
    large_map = ConvOp(256, 64, 1, (1, 1), (1, 1), 56, 56)

    def per_mac(op):
        return (model.conv_us(op) - CPU.op_overhead_us) / op.macs

    assert per_mac(wide) > 1.15 * per_mac(three) and per_mac(large_map) > 1.03 * per_mac(three)
    batch8 = ConvOp(2048, 512, 1, (1, 1), (1, 1), 7, 7, batch=8)
    assert per_mac(batch8) < per_mac(wide)  # the same weights serve 8 images
    assert per_mac(batch8) > per_mac(ConvOp(256, 256, 1, (3, 3), (1, 1), 14, 14, batch=8))
    arithmetic = (model.conv_us(wide) - CPU.op_overhead_us) * CPU.macs_per_us
    assert arithmetic == pytest.approx(wide.macs + 13 * wide.weight_elements + 6 * wide.map_elements)
    cuda = AnalyticalModel("cuda")
    assert cuda.conv_us(wide) == pytest.approx(
        cuda.profile.op_overhead_us + (wide.macs + 300 * wide.map_elements) / cuda.profile.macs_per_us)

    def cuda_per_mac(op):
        return (cuda.conv_us(op) - cuda.profile.op_overhead_us) / op.macs

    assert cuda_per_mac(large_map) > 2 * cuda_per_mac(three) and cuda_per_mac(large_map) > cuda_per_mac(wide)


def test_keys_round_trip():
    for op in (conv(144, 96, 2, 1, 7), GatherOp(256, 176, 56, 56, 8)):
        assert parse_key(op.key) == op
    assert parse_key("nonsense") is None


def test_measured_table_round_trip_and_fallback(tmp_path):
    fallback = AnalyticalModel("cpu")
    op = conv(128, 128)
    table = MeasuredTable("cpu", {op.key: 2 * fallback.conv_us(op)}, {"threads": 2})
    path = tmp_path / "t.json"
    table.save(path)
    loaded = load_cost_model("cpu", path)
    assert loaded.conv_us(op) == pytest.approx(2 * fallback.conv_us(op))
    other = conv(64, 128)
    assert loaded.conv_us(other) == pytest.approx(2 * fallback.conv_us(other))  # rescaled fallback
    assert loaded.meta == {"threads": 2}


def test_bad_tables_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        MeasuredTable.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        MeasuredTable.load(bad)
    bad.write_text(json.dumps({"format": "something"}))
    with pytest.raises(UserError, match="not an onnxprune latency table"):
        MeasuredTable.load(bad)
    good = tmp_path / "good.json"
    MeasuredTable("cpu").save(good)
    with pytest.raises(UserError, match="measured on provider"):
        MeasuredTable.load(good, "cuda")


def test_unknown_provider_is_a_user_error():
    with pytest.raises(UserError):
        AnalyticalModel("tpu")
