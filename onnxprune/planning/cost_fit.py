"""A Conv cost model fitted to whole-model latencies measured in ONNX Runtime.

Why whole models, not one-op timings: a Conv timed alone (``onnxprune autotune``) pays what it
does not pay inside a network — the session's per-run overhead and the layout reorders ORT puts
around a lone blocked Conv — so its table ranks cuts wrongly where those costs are large
relative to the Conv: on MobileNetV2 the plan from its own autotune table ran at 1.37× dense
where the analytical model's ran at 1.49× (batch 1, same run). Timing many pruned versions of a
few networks and fitting what each Conv *class* costs per MAC inside them measures the classes
as they run in a graph, including the fusions (Conv+Add+Relu) and the blocked-layout chains.

Model (microseconds per Conv, linear in the coefficients ``c``)::

    t(op) = c_1x1   · MACs  (group=1, block-aligned, 1×1)
          + c_kxk   · MACs  (group=1, block-aligned, larger kernels)
          + c_unal  · MACs  (group=1, channels off the SIMD block)
          + c_dw    · MACs  (depthwise)
          + c_grp   · MACs / analytical grouped efficiency  (other grouped Convs)
          + c_out   · output elements  (what the Conv writes, read by the next op)

A model's latency is the sum over its Convs plus a rest (pooling, Gemm, the non-fused
elementwise ops) that is one unknown per network and batch: ``fit`` solves for ``c`` and every
rest together, by non-negative least squares on relative error (each model's time counts as
much as any other's, whatever its size; rests are times, so they are kept >= 0 too — on the
recorded samples two of them sit at that bound, so the coefficients are loosely determined).
There is no per-Conv overhead term: pruning keeps a network's Conv count, so a constant per
Conv cannot be told apart from the rest. ``validate`` holds one network out: its rest is taken
from its dense model alone, as a user's planner would know it, and its pruned variants'
latencies are predicted; the baselines are the analytical model with its scale fitted the same
way and the analytical model as the planner uses it (the ratio of summed Conv times).

Gathers keep the analytical model's cost (it was set from in-graph measurements); the
coefficients are in-graph microseconds too, so both stay on one scale.

Status: a measurement tool, not the planner's default. Fitted on three of ResNet-18/50,
MobileNetV2 and EfficientNet-Lite0, it ranked the fourth's pruned variants about as well as the
analytical model of the sixth session or better, but its speedup predictions were not closer
than the planner's own ratio on ResNet-50, and plans made with it were no faster (slower on
MobileNetV2); benchmarks/README.md, "A cost model fitted to measurements", has the numbers.
Since the analytical CPU model charges memory traffic (``latency.py``) it ranks ResNet-50's
variants and ResNet-18's at batch 1 better than this fit (Spearman 0.95–0.99 against 0.93–0.94;
ResNet-18 at batch 8 level, 0.93).
The same fit applies to CUDA samples (``benchmarks/fit_cost_model.py measure --provider cuda``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .latency import AnalyticalModel, ConvOp, parse_key

FEATURES = ("macs_1x1", "macs_kxk", "macs_unaligned", "macs_depthwise", "macs_grouped", "output_elements")


@lru_cache(maxsize=None)
def _analytical(provider: str) -> AnalyticalModel:
    """One analytical model per provider (the feature functions run once per Conv per sample)."""
    return AnalyticalModel(provider)


def conv_features(op: ConvOp, provider: str = "cpu") -> np.ndarray:
    """``op``'s row of the design matrix, in ``FEATURES`` order (its class from the analytical
    model's rules: block alignment, depthwise, grouped efficiency)."""
    analytical = _analytical(provider)
    row = np.zeros(len(FEATURES))
    macs = float(op.macs)
    if op.groups == 1:
        if analytical.efficiency(op) < 1.0:
            row[2] = macs
        elif op.kernel == (1, 1):
            row[0] = macs
        else:
            row[1] = macs
    elif op.groups == op.c_in == op.c_out:
        row[3] = macs
    else:
        row[4] = macs / analytical.efficiency(op)
    row[5] = float(op.batch * op.c_out * op.h_out * op.w_out)
    return row


def analytical_features(op: ConvOp, provider: str = "cpu") -> np.ndarray:
    """The analytical model's estimate as the only feature: fitting it gives that model's shape
    with its scale measured the same way as the fitted model's (``validate``'s baseline)."""
    return np.array([_analytical(provider).conv_us(op)])


@dataclass(frozen=True)
class Sample:
    """One measured model: its network (``family``), batch, Convs and median latency; ``dense``
    marks the unpruned model of its network and batch."""

    family: str
    batch: int
    ops: tuple[ConvOp, ...]
    median_ms: float
    label: str = ""
    dense: bool = False

    @property
    def rest_key(self) -> tuple[str, int]:
        return (self.family, self.batch)

    def features(self, provider: str = "cpu", features=conv_features) -> np.ndarray:
        return np.sum([features(op, provider) for op in self.ops], axis=0)


@dataclass(frozen=True)
class Fit:
    """Fitted coefficients (µs per unit of each feature) and each network's rest (µs)."""

    provider: str
    coefficients: tuple[float, ...]
    rests: tuple[tuple[tuple[str, int], float], ...] = ()
    features: object = conv_features  # the design-matrix row of one op

    def conv_us(self, op: ConvOp) -> float:
        return float(self.features(op, self.provider) @ np.asarray(self.coefficients))

    def model(self) -> "FittedModel":
        """The planner's cost-model interface over these coefficients."""
        if self.features is not conv_features:
            raise ValueError("only a fit of conv_features makes a FittedModel")
        return FittedModel(self.provider, self.coefficients)


def fit(samples: list[Sample], provider: str = "cpu", features=conv_features) -> Fit:
    """Coefficients and per-network rests minimising the squared relative error of every sample."""
    from scipy.optimize import nnls

    if not samples:
        raise ValueError("no samples to fit")
    keys = sorted({s.rest_key for s in samples})
    columns = {key: i for i, key in enumerate(keys)}
    width = len(features(samples[0].ops[0], provider))
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
    rests = tuple((key, float(solution[width + i])) for key, i in columns.items())
    return Fit(provider, coefficients, rests, features)


def _conv_us(model, sample: Sample) -> float:
    """The summed Conv time of ``sample`` under a cost ``model`` (``conv_us``)."""
    return sum(model.conv_us(op) for op in sample.ops)


def predict_family(model, samples: list[Sample], dense: Sample) -> list[float]:
    """Predicted ms of ``samples`` from a cost ``model`` (``conv_us``), the family's rest taken
    from its dense model's measured time alone."""
    rest = dense.median_ms * 1e3 - _conv_us(model, dense)
    return [(_conv_us(model, s) + rest) / 1e3 for s in samples]


def planner_speedups(model, samples: list[Sample], dense: Sample) -> list[float]:
    """Speedups as the planner predicts them: dense Conv time over the variant's (no rest)."""
    return [_conv_us(model, dense) / _conv_us(model, s) for s in samples]


def validate(samples: list[Sample], provider: str = "cpu") -> dict:
    """Leave-one-network-out: fit on the others, predict the held-out network's variants.

    Per held-out network and batch: the median absolute error of the predicted speedup over the
    dense model and the Spearman correlation of predicted and measured latencies, for the fitted
    model, the analytical model with its scale fitted on the same networks
    (``analytical_features``) and the analytical model as the planner uses it
    (``planner_speedups``; its Spearman is that of speedups, the same ranking)."""
    from scipy.stats import spearmanr

    families = sorted({s.family for s in samples})
    if len(families) < 2:
        raise ValueError(f"leave-one-network-out needs samples of 2 or more networks, got {families}")
    out = {}
    for family in families:
        training = [s for s in samples if s.family != family]
        models = {"fitted": fit(training, provider), "analytical": fit(training, provider, analytical_features)}
        for batch in sorted({s.batch for s in samples if s.family == family}):
            group = [s for s in samples if s.family == family and s.batch == batch]
            dense = [s for s in group if s.dense]
            if len(dense) != 1:
                raise ValueError(f"{family} at batch {batch}: {len(dense)} dense samples, expected 1")
            variants = [s for s in group if not s.dense]
            if len(variants) < 3:
                continue
            measured_ms = np.array([s.median_ms for s in variants])
            measured = dense[0].median_ms / measured_ms
            row = {"variants": len(variants)}
            for name, model in models.items():
                predicted_ms = np.array(predict_family(model, variants, dense[0]))
                row[name] = {"median_abs_speedup_error": float(np.median(np.abs(
                                 dense[0].median_ms / predicted_ms - measured))),
                             "spearman": float(spearmanr(predicted_ms, measured_ms)[0])}
            speedups = np.array(planner_speedups(AnalyticalModel(provider), variants, dense[0]))
            row["planner"] = {"median_abs_speedup_error": float(np.median(np.abs(speedups - measured))),
                              "spearman": float(spearmanr(speedups, measured)[0])}
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


def load_samples(paths) -> tuple[list[Sample], str]:
    """Samples recorded by ``benchmarks/fit_cost_model.py measure`` and the provider they were
    timed on (all files must agree)."""
    import json
    from pathlib import Path

    samples, providers = [], set()
    for path in paths:
        for row in json.loads(Path(path).read_text(encoding="utf-8"))["samples"]:
            samples.append(Sample(row["family"], row["batch"], ops_from_keys(row["ops"]), row["median_ms"],
                                  row["label"], bool(row["dense"])))
            providers.add(row.get("provider", "cpu"))
    if len(providers) != 1:
        raise ValueError(f"samples from {len(providers)} providers ({sorted(providers)}): fit one at a time")
    return samples, providers.pop()


def ops_from_keys(keys) -> tuple[ConvOp, ...]:
    """The ``ConvOp`` of each ``ConvOp.key`` (recorded samples store their Convs as keys)."""
    ops = tuple(parse_key(key) for key in keys)
    if any(not isinstance(op, ConvOp) for op in ops):
        raise ValueError("every recorded op must be a conv key")
    return ops

