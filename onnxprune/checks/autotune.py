"""``onnxprune autotune MODEL.onnx``: measure the per-layer latencies the speed planner asks for.

Why: the analytical cost model (latency.py) carries the efficiency curve of one machine. On
another CPU (AVX2 instead of AVX-512, other cache sizes, other thread counts) the ranking of
configurations can change, so the planner can use a table measured where the model will run.

How: the planner is run over its whole rate grid with a cost model that records every Conv and
Gather shape it queries; each distinct shape is then built as a one-op ONNX model and timed in
ONNX Runtime with the same session settings as ``onnxprune bench`` (ORT_ENABLE_ALL, fixed
threads). Dense and G=1 Convs are measured first, then grouped ones by increasing G, Gathers
last, largest first within each; a ``--max-seconds`` budget so spends its time where the
planner's choices are made, and the rest fall back to the analytical model rescaled to the
measured ones.

A Gather timed alone does not pay the layout reorders ORT puts around it inside a blocked
network, so measured Gathers are multiplied by ``GATHER_LAYOUT_FACTOR`` (one copy for the Gather,
one for each reorder).
"""

from __future__ import annotations

import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..planning.latency import AnalyticalModel, ConvOp, GatherOp, MeasuredTable

GATHER_LAYOUT_FACTOR = 3.0


class RecordingModel(AnalyticalModel):
    """The analytical model, remembering every op the planner asked about."""

    def __init__(self, provider: str):
        super().__init__(provider)
        self.ops: dict[str, ConvOp | GatherOp] = {}

    def conv_us(self, op: ConvOp) -> float:
        self.ops[op.key] = op
        return super().conv_us(op)

    def gather_us(self, op: GatherOp) -> float:
        self.ops[op.key] = op
        return super().gather_us(op)


def planner_ops(model: onnx.ModelProto, config) -> tuple[list, AnalyticalModel]:
    """Every op the planner queries for ``model`` (normalized), largest estimate first."""
    from ..planning import speed_plan

    recorder = RecordingModel(config.provider)
    speed_plan.plan_speed(model, config, cost=recorder)
    ops = sorted(recorder.ops.values(), key=lambda op: (_priority(op), -_estimate(recorder, op), op.key))
    return ops, recorder


def _priority(op) -> int:
    """Measure first what the planner picks most: dense and G=1 Convs, then by groups, Gathers last."""
    return op.groups if isinstance(op, ConvOp) else 1000


def _estimate(model: AnalyticalModel, op) -> float:
    return model.conv_us(op) if isinstance(op, ConvOp) else model.gather_us(op)


def op_model(op: ConvOp | GatherOp, seed: int = 0) -> onnx.ModelProto:
    """A one-node model executing ``op`` (random weights; only the shape matters)."""
    rng = np.random.default_rng(seed)
    if isinstance(op, GatherOp):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [op.batch, op.c_src, op.h, op.w])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [op.batch, op.c_out, op.h, op.w])
        idx = numpy_helper.from_array(np.arange(op.c_out, dtype=np.int64)[::-1].copy() % op.c_src, "idx")
        node = helper.make_node("Gather", ["x", "idx"], ["y"], axis=1)
        graph = helper.make_graph([node], "gather", [x], [y], [idx])
    else:
        (kh, kw), (sh, sw) = op.kernel, op.stride
        ph, pw = kh // 2, kw // 2
        h_in = (op.h_out - 1) * sh + kh - 2 * ph
        w_in = (op.w_out - 1) * sw + kw - 2 * pw
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [op.batch, op.c_in, h_in, w_in])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [op.batch, op.c_out, op.h_out, op.w_out])
        w = rng.standard_normal((op.c_out, op.c_in // op.groups, kh, kw)).astype(np.float32) * 0.05
        node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[kh, kw], strides=[sh, sw],
                                pads=[ph, pw, ph, pw], group=op.groups)
        graph = helper.make_graph([node], "conv", [x], [y], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def measure_op(op, settings, repeat: int = 10, warmup: int = 3) -> float:
    """Median microseconds of one run of ``op`` (Gathers scaled by GATHER_LAYOUT_FACTOR)."""
    from .bench import interleave, make_feeds, make_session, runner

    model = op_model(op)
    sess = make_session(model, settings)
    feeds = make_feeds(model, op.batch)
    samples = interleave([runner(sess, feeds, settings)], repeat, warmup)[0]
    us = float(np.median(samples)) * 1e6
    return us * GATHER_LAYOUT_FACTOR if isinstance(op, GatherOp) else us


def autotune(model: onnx.ModelProto, config, settings, repeat: int = 10, max_seconds: float = 600.0,
             table: MeasuredTable | None = None, log=None) -> MeasuredTable:
    """Measure the planner's ops for ``model`` (normalized) into ``table`` (new if None)."""
    import onnxruntime as ort

    ops, _ = planner_ops(model, config)
    table = table or MeasuredTable(config.provider)
    table.meta.update({"onnxruntime": ort.__version__, "threads": settings.resolved_threads(),
                       "repeat": repeat, "gather_layout_factor": GATHER_LAYOUT_FACTOR})
    start = time.perf_counter()
    todo = [op for op in ops if op.key not in table.entries]
    for i, op in enumerate(todo):
        if time.perf_counter() - start > max_seconds:
            if log:
                log(f"time budget spent: {len(todo) - i} of {len(todo)} ops left to the analytical fallback")
            break
        table.entries[op.key] = round(measure_op(op, settings, repeat), 2)
        if log and (i % 25 == 0 or i == len(todo) - 1):
            log(f"[{i + 1}/{len(todo)}] {op.key}: {table.entries[op.key]:.1f} us")
    table._scale = None
    return table
