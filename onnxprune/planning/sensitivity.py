"""How much the network's output changes when one Conv keeps fewer input channels — measured.

Why: a cut that saves time is worth nothing if it loses the model. On real ImageNet nets the
layers differ by orders of magnitude in how much of a cut they tolerate (MobileNetV2's expansion
Convs read the whole residual stream; a project Conv's inputs are highly redundant), and a
planner that chooses by speed alone concentrates the cut exactly where it hurts. This module
gives the planner a *fidelity cost* for every candidate width of every prunable Conv, so it can
spend the MACs budget where the output changes least (``allocate.py``).

How, with calibration data (``measure``):
1. One pass over the dense model (``calib_stream.Stream``, segment by segment) collects, per
   candidate Conv, the moments of its im2col input over *all* input channels and of its output.
2. Block forward selection on those moments (``least_squares.greedy_channels``, adding up to
   C_in/``least_squares.GREEDY_STEPS`` channels per step; redundant channels can share a step on
   wide layers) orders the input channels so that every prefix explains as much of the output
   as the greedy can; because the order is nested, the least-squares refit error at every
   candidate width n is read off the same moments (``least_squares.solve_group`` /
   ``squared_error``): ``rel_err(n)``, the error the refit leaves in this layer's output,
   relative to the output's energy.
3. Output sensitivity: at a few widths per layer the refit layer is substituted into the dense
   model (only this layer changed; weights fed as inputs of one ORT session per layer that runs
   only the nodes from this layer on, from cached held-out activations) and the
   mean KL(dense || candidate) of the first output is measured on held-out samples (the
   calibration split's held-out slice, never used for the moments). Between measured widths
   the KL is predicted as ``α(n) · rel_err(n)``, ``α`` (KL per unit of layer error) interpolated
   between the measured widths, so each layer costs ``PROBES`` forward passes whatever the
   number of widths. A narrower width is never cheaper than a wider one (monotone envelope).

Without data (``weight_proxy``) the cost is the fraction of the layer's squared weight norm in
the dropped input channels (channels ordered by norm) — conservative and *not* a fidelity
measurement: the report says fidelity is unmeasured.

The measured curves are plain data (``LayerSensitivity``) and go into the JSON report.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import helper
from threadpoolctl import threadpool_limits

from ..calibration.calib_stream import (Stream, batch_size, compare_first_output, count, node_reads,
                                        split_holdout)
from ..calibration.least_squares import (DEFAULT_RIDGE, GREEDY_BUDGET, GREEDY_STEPS, ConvGeometry, accumulate,
                                         greedy_channels, solve_group, squared_error)
from ..calibration.refit_steps import layer_bias
from ..ir.graph import GraphIndex
from ..ir.model_io import MAX_IR_VERSION
from ..checks.class_scores import as_logits, output_kinds
from ..checks.verify import session

PROBES = 4  # widths per layer whose effect on the network output is measured (the narrowest + 3)
FIT_SAMPLES = 128  # samples whose moments give the refit error curves
PROBE_SAMPLES = 64  # held-out samples the output change is measured on


@dataclass
class LayerSensitivity:
    """Fidelity cost of narrowing one Conv to each candidate width (input channels kept)."""

    name: str
    c_in: int
    widths: list[int]
    rel_err: list[float]  # layer output error after the least-squares refit, relative
    cost: list[float]  # predicted mean KL of the network output (or the data-free proxy)
    measured: dict[int, dict] = field(default_factory=dict)  # width -> {"kl", "top1_agreement"}
    source: str = "calibration data"

    def cost_at(self, n: int) -> float:
        """Cost of keeping ``n`` channels (interpolated between listed widths, 0 when dense)."""
        if n >= self.c_in:
            return 0.0
        xs = [*self.widths, self.c_in]
        ys = [*self.cost, 0.0]
        return float(np.interp(n, xs, ys))

    def as_dict(self) -> dict:
        data = asdict(self)
        data["measured"] = {str(k): v for k, v in self.measured.items()}
        return data


@dataclass
class SensitivityReport:
    layers: dict[str, LayerSensitivity]
    source: str  # "calibration data" or "weights (data-free proxy; fidelity unmeasured)"
    fit_samples: int = 0
    probe_samples: int = 0
    wall_s: float = 0.0

    def as_dict(self) -> dict:
        return {"source": self.source, "fit_samples": self.fit_samples, "probe_samples": self.probe_samples,
                "wall_s": round(self.wall_s, 3), "layers": [s.as_dict() for s in self.layers.values()]}


def weight_proxy(model: onnx.ModelProto, widths: dict[str, list[int]]) -> SensitivityReport:
    """Data-free cost: fraction of ‖W‖² in the input channels dropped (smallest norms first)."""
    index = GraphIndex(model.graph)
    nodes = {n.name: n for n in model.graph.node}
    layers = {}
    for name, candidates in widths.items():
        weight = index.constant(nodes[name].input[1]).astype(np.float64)
        energy = np.sort(np.sum(weight ** 2, axis=(0, 2, 3)))[::-1]  # per input channel, descending
        total = max(float(energy.sum()), 1e-30)
        kept = np.cumsum(energy)
        rel = [float(1.0 - kept[n - 1] / total) for n in candidates]
        layers[name] = LayerSensitivity(name, weight.shape[1], list(candidates), rel, list(rel),
                                        source="weights")
    return SensitivityReport(layers, "weights (data-free proxy; fidelity unmeasured)")


def measure(model: onnx.ModelProto, feeds: dict, widths: dict[str, list[int]], progress=None) -> SensitivityReport:
    """Measured cost curves for the Convs in ``widths`` (name -> ascending candidate widths)."""
    started = time.perf_counter()
    # a model with a fixed batch size runs only whole batches of it (calibrate's rule: sample
    # counts cut to a multiple)
    batch, unit, feeds = batch_size(model, feeds, [])
    fit, held = split_holdout(feeds, unit)
    if not count(held):
        held = fit
    fit = {k: v[:_whole(FIT_SAMPLES, unit)] for k, v in fit.items()}
    held = {k: v[:_whole(PROBE_SAMPLES, unit)] for k, v in held.items()}
    kinds = output_kinds(model)
    reference = graph_outputs(model, held, batch, kinds=kinds)
    position = {node.name: i for i, node in enumerate(model.graph.node)}
    order = sorted(widths, key=lambda name: position[name])
    index = GraphIndex(model.graph)
    stream, held_stream = Stream(model, fit, batch), Stream(model, held, batch)
    layers = {}
    for i, name in enumerate(order):
        if progress is not None:
            progress(i, len(order), name)
        node = model.graph.node[position[name]]
        x = stream.advance(position[name])[node.input[0]]
        y = stream.advance(position[name] + 1, keep=(node.output[0],))[node.output[0]]
        weight = index.constant(node.input[1])
        bias = layer_bias(index, node, weight.shape[0], weight.dtype)
        with threadpool_limits(limits=1, user_api="blas"):
            curve = refit_curve(node, weight, bias, x, y, widths[name])
        del x, y
        live = held_stream.advance(position[name])
        held_stream.check_readable(n for node in model.graph.node[position[name]:] for n in node_reads(node))
        layers[name] = _probe(_suffix_model(model, position[name], live), node, curve, live, reference, kinds,
                              batch, model.graph.output[0].name)
    if progress is not None and order:
        progress(len(order), len(order), "")
    return SensitivityReport(layers, "calibration data", count(fit), count(held), time.perf_counter() - started)


def _whole(samples: int, unit: int) -> int:
    """``samples`` rounded down to whole batches of ``unit`` (at least one batch)."""
    return max(unit, samples // unit * unit)


@dataclass
class _Curve:
    widths: list[int]
    rel_err: list[float]
    fits: list[tuple[np.ndarray, np.ndarray]]  # (weight, bias) refit at each width
    c_in: int


def refit_curve(node: onnx.NodeProto, weight: np.ndarray, bias: np.ndarray, x: np.ndarray, y: np.ndarray,
                widths: list[int]) -> _Curve:
    """Nested data-aware channel order, then the ridge refit (calibrate's) at every width."""
    c_out, c_in, kh, kw = weight.shape
    k2 = kh * kw
    geo = ConvGeometry.of(node, (kh, kw), x.shape[2:])
    m = accumulate(x, y, np.arange(c_in), geo)
    rows = np.arange(c_out)
    greedy = c_in * c_in * k2 ** 3 * max(widths) <= GREEDY_BUDGET
    order = greedy_channels(m, rows, k2, max(widths), DEFAULT_RIDGE, greedy=greedy, nested=True,
                            chunk=max(1, c_in // GREEDY_STEPS))
    energy = max(float(m.yy.sum()), 1e-30)
    w_full = weight.astype(np.float64).reshape(c_out, c_in, k2)
    rel, fits = [], []
    for n in widths:
        kept = sorted(order[:n])
        idx = np.concatenate([np.arange(c * k2, (c + 1) * k2) for c in kept])
        w0 = w_full[:, kept].reshape(c_out, -1).T
        w, b = solve_group(m, idx, rows, w0, DEFAULT_RIDGE)
        err = squared_error(m, idx, rows, w, b)
        e0 = squared_error(m, idx, rows, w0, bias.astype(np.float64))
        if not err <= e0:
            w, b, err = w0, bias.astype(np.float64), e0
        rel.append(err / energy)
        full = np.zeros((c_out, c_in, kh, kw))
        full[:, kept] = w.T.reshape(c_out, len(kept), kh, kw)
        fits.append((full.astype(weight.dtype), b.astype(weight.dtype)))
    return _Curve(list(widths), rel, fits, c_in)


UNMEASURABLE = 1e6  # cost of a cut whose effect reaches only outputs fidelity cannot be measured on


def graph_outputs(model: onnx.ModelProto, feeds: dict, batch: int, names=None,
                  kinds: dict | None = None) -> dict[str, np.ndarray]:
    """The graph outputs a change is measured on, by name (as ``class_scores.as_logits`` makes
    them comparable: float64, class axis second): float data with one row per input sample.
    Others — a scalar statistic, class labels, detections whose count depends on the data —
    cannot be compared sample by sample. When no output qualifies, the first output as it is
    (what fidelity was measured on before outputs were told apart). ``names``: exactly these
    outputs, unfiltered (a changed model's, to compare with a reference's). ``kinds``: the
    outputs' ``class_scores.output_kinds`` (default: ``model``'s own)."""
    kinds = output_kinds(model) if kinds is None else kinds
    sess = session(model)
    wanted = list(names) if names is not None else [o.name for o in sess.get_outputs()]
    parts = [sess.run(wanted, {k: v[s:s + batch] for k, v in feeds.items()}) for s in range(0, count(feeds), batch)]
    if names is not None:
        return {name: as_logits(np.concatenate([np.atleast_1d(p[i]) for p in parts]), kinds[name])
                for i, name in enumerate(wanted)}
    sizes = [min(batch, count(feeds) - s) for s in range(0, count(feeds), batch)]
    measurable = {}
    for i, name in enumerate(wanted):
        values = [p[i] for p in parts]
        if all(np.issubdtype(v.dtype, np.floating) and v.ndim >= 1 and v.shape[0] == size
               for v, size in zip(values, sizes)):
            measurable[name] = as_logits(np.concatenate(values), kinds[name])
    if not measurable:
        measurable[wanted[0]] = as_logits(np.concatenate([np.atleast_1d(p[0]) for p in parts]), kinds[wanted[0]])
    return measurable


def output_change(reference: dict[str, np.ndarray], got: dict[str, np.ndarray], first: str) -> dict:
    """How much a change moved the network's outputs: Σ over the measured outputs (``reference``'s)
    in ``got`` of the mean KL (class scores) or the relative squared error (anything else), so a
    cut that only reaches a second head of a detector is not free; an output whose shape changed
    counts as wholly changed (1). Top-1 agreement on the first graph output ``first`` when it is
    among them (else None)."""
    total, agreement = 0.0, None
    for name, value in got.items():
        if name not in reference:
            continue
        if value.shape != reference[name].shape:
            total += 1.0
            continue
        stats = compare_first_output(reference[name], value)
        total += stats["mean_kl"] if stats["mean_kl"] is not None else stats["rel_mse"]
        if name == first:
            agreement = stats["top1_agreement"]
    return {"kl": total, "top1_agreement": agreement}


def _probe(probe: onnx.ModelProto | None, node: onnx.NodeProto, curve: _Curve, live: dict,
           reference: dict[str, np.ndarray], kinds: dict, batch: int, first: str) -> LayerSensitivity:
    """Measure the output change at ``PROBES`` widths spread over the curve; predict the rest.
    ``probe`` None: the layer reaches no graph output (dead code), its cuts cost nothing.
    ``kinds``: the whole model's output kinds (the probe may start after its Softmax)."""
    if probe is None:
        return LayerSensitivity(node.name, curve.c_in, curve.widths, [float(r) for r in curve.rel_err],
                                [0.0] * len(curve.widths), {})
    sess = session(probe)
    outs = [o.name for o in sess.get_outputs() if o.name in reference]
    if not outs:  # it reaches only outputs a change cannot be measured on: never cut it blind
        return LayerSensitivity(node.name, curve.c_in, curve.widths, [float(r) for r in curve.rel_err],
                                [UNMEASURABLE] * len(curve.widths), {})
    names = [i.name for i in sess.get_inputs() if i.name not in (_W, _B)]
    count = len(next(iter(reference.values())))
    last = len(curve.widths) - 1
    picks = sorted({0, *(int(round(i)) for i in np.linspace(last // 3, last, PROBES - 1))})
    measured, at, ratios = {}, [], []
    for i in picks:
        w, b = curve.fits[i]
        parts = []
        for s in range(0, count, batch):
            feed = {name: live[name][s:s + batch] for name in names}
            feed.update({_W: w, _B: b})
            parts.append(sess.run(outs, feed))
        got = {name: as_logits(np.concatenate([np.atleast_1d(p[j]) for p in parts]), kinds[name])
               for j, name in enumerate(outs)}
        measured[curve.widths[i]] = output_change(reference, got, first)
        kl = measured[curve.widths[i]]["kl"]
        at.append(curve.widths[i])
        ratios.append(kl / max(curve.rel_err[i], 1e-12))
    # between measured widths the KL per unit of layer error is interpolated (nearest beyond them)
    cost = [measured[n]["kl"] if n in measured else float(np.interp(n, at, ratios)) * rel
            for n, rel in zip(curve.widths, curve.rel_err)]
    # a narrower layer never costs less than a wider one (measurement noise aside)
    cost = list(np.maximum.accumulate(np.asarray(cost)[::-1])[::-1])
    return LayerSensitivity(node.name, curve.c_in, curve.widths, [float(r) for r in curve.rel_err],
                            [float(c) for c in cost], measured)


_W, _B = "onnxprune_probe_weight", "onnxprune_probe_bias"


def _suffix_model(model: onnx.ModelProto, position: int, live: dict) -> onnx.ModelProto | None:
    """The nodes from ``position`` (the probed Conv) to the end, fed from the cached ``live``
    tensors, with the Conv's weight and bias read from graph inputs: one session per layer runs
    every candidate width, and nothing before the layer is recomputed. Its outputs are the graph
    outputs those nodes compute (a head computed earlier in graph order is not among them); None
    when there are none."""
    nodes = []
    for i, original in enumerate(model.graph.node[position:]):
        copy = onnx.NodeProto()
        copy.CopyFrom(original)
        if i == 0:
            while len(copy.input) < 3:
                copy.input.append("")
            copy.input[1], copy.input[2] = _W, _B
        nodes.append(copy)
    produced = {name for node in nodes for name in node.output if name}
    outputs = [o for o in model.graph.output if o.name in produced]
    if not outputs:
        return None
    reads = list(dict.fromkeys(name for node in nodes for name in node_reads(node)))
    initializers = {t.name: t for t in model.graph.initializer}
    inputs = [name for name in reads if name not in produced and name not in initializers and name in live]
    weight = GraphIndex(model.graph).constant(model.graph.node[position].input[1])
    elem = helper.np_dtype_to_tensor_dtype(weight.dtype)
    graph = helper.make_graph(
        nodes, "sensitivity_probe",
        [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(live[name].dtype), None)
         for name in inputs]
        + [helper.make_tensor_value_info(_W, elem, list(weight.shape)),
           helper.make_tensor_value_info(_B, elem, [weight.shape[0]])],
        outputs, [initializers[name] for name in reads if name in initializers])
    probe = helper.make_model(graph, opset_imports=list(model.opset_import),
                              ir_version=min(model.ir_version, MAX_IR_VERSION))
    probe.functions.extend(model.functions)
    return probe
