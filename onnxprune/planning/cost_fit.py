"""A Conv cost model fitted to whole-model latencies measured in ONNX Runtime.

Why whole models, not one-op timings: a Conv timed alone (``onnxprune autotune``) pays what it
does not pay inside a network — the session's per-run overhead and the layout reorders ORT puts
around a lone blocked Conv — so its table ranks cuts wrongly where those costs are large
relative to the Conv: on MobileNetV2 the plan from its own autotune table ran at 1.37× dense
where the analytical model's ran at 1.49× (batch 1, same run). Timing many pruned versions of a
few networks and fitting what each Conv *class* costs per MAC inside them measures the classes
as they run in a graph, including the fusions (Conv+Add+Relu) and the blocked-layout chains.

Model (microseconds per Conv, linear in the coefficients ``c``)::

    t(op) = c_overhead
          + c_1x1   · MACs  (group=1, block-aligned, 1×1)
          + c_kxk   · MACs  (group=1, block-aligned, larger kernels)
          + c_unal  · MACs  (group=1, channels off the SIMD block)
          + c_dw    · MACs  (depthwise)
          + c_grp   · MACs / analytical grouped efficiency  (other grouped Convs)
          + c_out   · output elements  (what the Conv writes, read by the next op)

A model's latency is the sum over its Convs plus a rest (pooling, Gemm, the non-fused
elementwise ops) that is one unknown per network and batch: ``fit`` solves for ``c`` and every
rest together, by non-negative least squares on relative error (each model's time counts as
much as any other's, whatever its size). ``validate`` holds one network out: its rest is taken
from its dense model alone, as a user's planner would know it, and its pruned variants'
latencies are predicted.

Gathers keep the analytical model's cost (it was set from in-graph measurements); the
coefficients are in-graph microseconds too, so both stay on one scale.

Status: a measurement tool, not the planner's default. Fitted on three of ResNet-18/50,
MobileNetV2 and EfficientNet-Lite0, it predicts the fourth's latencies better than the
analytical model, but plans made with it were no faster than the analytical model's (slower on
MobileNetV2); benchmarks/README.md, "A cost model fitted to measurements", has the numbers.
The same fit applies to CUDA samples (``benchmarks/fit_cost_model.py measure --provider cuda``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .latency import AnalyticalModel, ConvOp, grouped_efficiency, on_fast_path, parse_key, profile

FEATURES = ("overhead", "macs_1x1", "macs_kxk", "macs_unaligned", "macs_depthwise", "macs_grouped",
            "output_elements")


def conv_features(op: ConvOp, provider: str = "cpu") -> np.ndarray:
    """``op``'s row of the design matrix, in ``FEATURES`` order."""
    prof = profile(provider)
    row = np.zeros(len(FEATURES))
    row[0] = 1.0
    macs = float(op.macs)
    if op.groups == 1:
        if not on_fast_path(op, prof):
            row[3] = macs
        elif op.kernel == (1, 1):
            row[1] = macs
        else:
            row[2] = macs
    elif op.groups == op.c_in == op.c_out:
        row[4] = macs
    else:
        efficiency = grouped_efficiency(op.c_out // op.groups, prof)
        row[5] = macs / (efficiency if on_fast_path(op, prof) else efficiency * prof.unaligned_grouped)
    row[6] = float(op.batch * op.c_out * op.h_out * op.w_out)
    return row


@dataclass(frozen=True)
class Sample:
    """One measured model: its network (``family``), batch, Convs and median latency."""

    family: str
    batch: int
    ops: tuple[ConvOp, ...]
    median_ms: float
    label: str = ""

    @property
    def rest_key(self) -> tuple[str, int]:
        return (self.family, self.batch)

    def features(self, provider: str = "cpu", features=None) -> np.ndarray:
        features = features or conv_features
        return np.sum([features(op, provider) for op in self.ops], axis=0)


@dataclass(frozen=True)
class Fit:
    """Fitted coefficients (``FEATURES`` order, µs per unit) and each network's rest (µs)."""

    provider: str
    coefficients: tuple[float, ...]
    rests: dict = field(default_factory=dict)
    features: object = None  # the design-matrix row of one op (default ``conv_features``)

    def conv_us(self, op: ConvOp) -> float:
        return float((self.features or conv_features)(op, self.provider) @ np.asarray(self.coefficients))


def analytical_features(op: ConvOp, provider: str = "cpu") -> np.ndarray:
    """The analytical model's estimate as the only feature: fitting it gives that model's shape
    with its scale measured the same way as the fitted model's (``validate``'s baseline)."""
    return np.array([AnalyticalModel(provider).conv_us(op)])


def fit(samples: list[Sample], provider: str = "cpu", features=None) -> Fit:
    """Coefficients and per-network rests minimising the squared relative error of every sample."""
    from scipy.optimize import nnls

    keys = sorted({s.rest_key for s in samples})
    columns = {key: i for i, key in enumerate(keys)}
    width = len((features or conv_features)(samples[0].ops[0], provider))
    design = np.zeros((len(samples), width + len(keys)))
    target = np.zeros(len(samples))
    for row, sample in enumerate(samples):
        design[row, :width] = sample.features(provider, features)
        design[row, width + columns[sample.rest_key]] = 1.0
        target[row] = sample.median_ms * 1e3
    weight = 1.0 / target
    # scale columns to unit norm so nnls sees a well-conditioned problem (MACs ~1e9, counts ~1e1)
    scaled = design * weight[:, None]
    norms = np.linalg.norm(scaled, axis=0)
    norms[norms == 0] = 1.0
    solution, _ = nnls(scaled / norms, target * weight)
    solution = solution / norms
    coefficients = tuple(float(v) for v in solution[:width])
    rests = {key: float(solution[width + i]) for key, i in columns.items()}
    return Fit(provider, coefficients, rests, features)


def predict_family(model, samples: list[Sample], dense: Sample) -> list[float]:
    """Predicted ms of ``samples`` from a cost ``model`` (``conv_us``), the family's rest taken
    from its dense model's measured time alone."""
    def convs(sample):
        return sum(model.conv_us(op) for op in sample.ops)

    rest = dense.median_ms * 1e3 - convs(dense)
    return [(convs(s) + rest) / 1e3 for s in samples]


def validate(samples: list[Sample], dense_labels: dict, provider: str = "cpu") -> dict:
    """Leave-one-network-out: fit on the others, predict the held-out network's variants.

    ``dense_labels``: family -> label of its dense sample. Returns per family and batch the
    median absolute error of predicted speedup over dense, and the Spearman correlation of
    predicted and measured latencies, for the fitted model and for the analytical model with
    its scale fitted on the same networks (``analytical_features``)."""
    from scipy.stats import spearmanr

    out = {}
    for family in sorted({s.family for s in samples}):
        training = [s for s in samples if s.family != family]
        fitted = fit(training, provider)
        analytical = fit(training, provider, analytical_features)
        for batch in sorted({s.batch for s in samples if s.family == family}):
            group = [s for s in samples if s.family == family and s.batch == batch]
            dense = next(s for s in group if s.label == dense_labels[family])
            variants = [s for s in group if s is not dense]
            if len(variants) < 3:
                continue
            measured = np.array([dense.median_ms / s.median_ms for s in variants])
            row = {"variants": len(variants)}
            for name, model in (("fitted", fitted), ("analytical", analytical)):
                predicted = np.array([dense.median_ms / ms for ms in predict_family(model, variants, dense)])
                row[name] = {"median_abs_speedup_error": float(np.median(np.abs(predicted - measured))),
                             "spearman": float(spearmanr(predicted, measured)[0])}
            out[f"{family}/b{batch}"] = row
    return out


class FittedModel(AnalyticalModel):
    """The cost-model interface over fitted coefficients (Gathers: the analytical cost)."""

    source = "fitted"

    def __init__(self, provider: str, coefficients):
        super().__init__(provider)
        self.coefficients = np.asarray(coefficients, dtype=float)

    def conv_us(self, op: ConvOp) -> float:
        return float(conv_features(op, self.provider) @ self.coefficients)


def model_conv_ops(model, batch: int = 1) -> tuple[ConvOp, ...]:
    """Every Conv of ``model`` (static shapes at batch 1, counted at ``batch``), in graph order."""
    from ..ir.graph import GraphIndex, get_attr
    from ..ir.shape_facts import static_shapes_at_batch_one

    index = GraphIndex(model.graph)
    shapes = static_shapes_at_batch_one(model)
    ops = []
    for node in model.graph.node:
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            continue
        weight = index.constant(node.input[1])
        x, y = shapes.get(node.input[0]), shapes.get(node.output[0])
        if weight is None or x is None or y is None or len(x) != 4 or len(y) != 4 or weight.ndim != 4:
            raise ValueError(f"Conv {node.name!r}: no static shape or constant weight")
        strides = tuple(int(v) for v in get_attr(node, "strides", [1, 1]))
        ops.append(ConvOp(int(x[1]), int(weight.shape[0]), int(get_attr(node, "group", 1)),
                          (int(weight.shape[2]), int(weight.shape[3])), strides, int(y[2]), int(y[3]), batch))
    return tuple(ops)


def load_samples(paths) -> tuple[list[Sample], dict[str, str]]:
    """Samples recorded by ``benchmarks/fit_cost_model.py measure`` and each family's dense label."""
    import json
    from pathlib import Path

    samples, dense = [], {}
    for path in paths:
        for row in json.loads(Path(path).read_text(encoding="utf-8"))["samples"]:
            samples.append(Sample(row["family"], row["batch"], ops_from_keys(row["ops"]), row["median_ms"],
                                  row["label"]))
            if row["dense"]:
                dense[row["family"]] = row["label"]
    return samples, dense


def ops_from_keys(keys) -> tuple[ConvOp, ...]:
    """The ``ConvOp`` of each ``ConvOp.key`` (recorded samples store their Convs as keys)."""
    ops = tuple(parse_key(key) for key in keys)
    if any(not isinstance(op, ConvOp) for op in ops):
        raise ValueError("every recorded op must be a conv key")
    return ops

