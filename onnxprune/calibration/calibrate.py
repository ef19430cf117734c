"""Calibration-data recovery: refit the kept grouped kernels so each pruned Conv reproduces
the original layer's output, from a few hundred unlabelled inputs, with no training.

Why: pruning a third or more of every layer's grouped kernels and simply dropping them
compounds layer after layer (the paper's one-shot ResNets fall to ~20% accuracy before
fine-tuning). Most of that loss is recoverable in closed form: the kept kernels of a group can
take over what the pruned ones contributed, because neighbouring input channels are correlated.

How (per planned Conv, in graph order):
1. Its input ``X`` is taken from the *pruned* model built so far (earlier layers already pruned
   and refit; the "masked dense" model, with pruned kernels zeroed, computes exactly what the
   rewritten model computes) and its target output ``Y`` from the *original* model. So each
   layer also corrects the error accumulated upstream. Two refinements (both on by default,
   chosen on a validation split of *training* images, see benchmarks/README.md):
   - residual target (``calib_target="residual"``): a Conv whose only reader is a residual
     ``Add(conv, skip)`` is fit to ``Y + skip_original − skip_pruned``, so the *sum* the network
     sees matches, cancelling the error the skip path carries (He et al. 2017, §3.3);
   - dense followers (``calib_layers="all"``): Convs the plan leaves dense and the Gemm head,
     after the first pruned layer, are refit the same way with all their kernels (the rewrite
     leaves their shapes alone), so upstream error is corrected where it arrives.
2. Both models are run in ONNX Runtime *segment by segment*: only the nodes between the
   previous planned Conv and this one, fed from cached tensors that are still needed later.
   Every node is thus run once per model instead of once per layer (ResNet-56: 2 forward
   passes instead of ~55).
3. Sufficient statistics are accumulated over batches of im2col rows (input channels the plan
   keeps anywhere in the layer, honouring stride, pads, auto_pad, dilation and kernel size):
   ``XᵀX``, ``XᵀY``, ``ΣX``, ``ΣY``, ``ΣY²``. Memory is bounded by one batch of im2col rows plus
   the cached activations, independent of the number of spatial positions accumulated.
4. Per group g (filters R_g, kept channels K_g): ridge least squares *towards the original kept
   kernels* ``w0``, with a free (unregularised) bias::

       min_w,b ||Y_R - X_K w - b||² + λ ||w - w0||²,  λ = ridge · trace(Cov(X_K)) / dim

   Because ``(w0, b0)`` is a feasible point, the refit error on the calibration rows can never
   exceed the plain-pruning error (the solution is kept only if it is not worse, a guard against
   round-off). The prior towards ``w0`` keeps small calibration sets from overfitting.
   BatchNormalization was folded into the Conv by ``normalize()``, so the re-estimated bias *is*
   the BN shift recomputed for the pruned layer's input statistics (per-channel mean recovery).
5. Kept channels (default ``calib_selection="data"``): per group, a greedy block forward
   selection on the same moments proposes the input channels that best explain the group's
   original output; the set (plan's weight-only choice or this one) that refits better is kept
   and recorded in the plan ``calibrate`` returns (a new ``LayerPlan`` for each layer it
   changed, with ``provenance["channels"]`` saying so), so rewrite and verification follow it.
   The last 1/8 of the fit samples (whole inputs, never rows of a fitted input) validates the
   ridge strength, over four decades up to "keep the original kernels, refit only the bias",
   and this choice first.
   Why always, not only where rows per unknown are few: rows of one input are strongly
   correlated, so a 7×7 layer with ~1000 inputs fitted on ~450 images has far fewer independent
   rows than it seems. On MobileNetV2 at 0.70 MACs, fixed ridge: fit-set KL 0.08, held-out
   photos 0.57; validated: held-out 0.49, top-1 agreement 60% -> 65% (benchmarks/README.md).
   ``calib_selection="weights"`` or a given plan (``--plan-in``) keeps the plan's channels and
   only refits.
6. Fidelity on a held-out slice (the last 1/8 of the samples, never used for fitting): top-1
   agreement and mean KL(original || pruned) of the first output, before and after refit.

The returned model is the normalized graph with each planned Conv's weight refit (pruned
kernels exactly zero) and bias refit (added when the Conv had none); initializer names of the
weights are unchanged, so the rewrite and verification against the masked model stay exact.
The plan passed in is never edited: the decisions come back as a new ``Plan`` next to the model
(``Calibrated``). Why: the fidelity-budget search calibrates several plans, and the coupled
groups and ``--plan-in`` hand plans in from elsewhere; a stage that edits its input in place
makes whoever still holds that plan see decisions it never made, and the order of stages then
matters invisibly.

Modules: this one decides what is refit and writes the result into the graph; the array
mathematics (im2col, moments, ridge least squares, greedy selection) is ``least_squares``, and
feeding the data through the graph (batches, held-out slice, segment runner, fidelity) is
``calib_stream``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import onnx
from threadpoolctl import threadpool_limits

from .calib_data import load_calibration_inputs
from .calib_stream import HELD_OUT, HOLDOUT_DIVISOR, Stream, batch_size, count, fidelity, split_holdout
from ..errors import UserError
from ..ir.graph import GraphIndex, NameAllocator, get_attr, set_initializer
from .least_squares import (DEFAULT_RIDGE, GREEDY_BUDGET, GREEDY_STEPS, ConvGeometry, accumulate, fit_group,
                            greedy_channels)
from ..planning.plan import LayerPlan, Plan
from .refit_steps import (bias_name, dense_followers, gemm_as_conv_weight, is_disjoint, layer_bias, masked_copy,
                          ordered_layers, residual_partners)
from ..checks.verify import masked_model

__all__ = ["Calibrated", "calibrate", "dense_followers", "is_disjoint", "layer_bias", "ordered_layers",
           "refit_layer", "refit_weights", "residual_partners"]


@dataclass(frozen=True)
class Calibrated:
    """What ``calibrate`` returns: the refit model, the plan it was refit for and its report.

    ``plan`` is a new ``Plan`` whenever data-aware selection changed kept channels (the changed
    layers are new ``LayerPlan`` objects, the others are shared with the input plan); the rewrite
    and the verification must use it, not the plan passed in, since the refit weights are zero
    exactly outside its kept kernels."""
    model: onnx.ModelProto
    plan: Plan
    report: dict


def calibrate(model: onnx.ModelProto, plan: Plan, config, progress=None, feeds: dict | None = None,
              notes: list[str] | None = None) -> Calibrated:
    """Refit the planned Convs of ``model`` (normalized) on ``config.calib`` -> ``Calibrated``.

    ``plan`` is left as it is; the kept channels chosen on the data come back in the result's plan.

    ``config`` needs ``calib`` (path or ``{input: array}``) and ``calib_size``; optional
    ``calib_ridge`` overrides ``DEFAULT_RIDGE``. ``feeds`` (with the conversion ``notes`` made
    while loading them): the calibration inputs already loaded by the caller — the pipeline loads
    them once, before planning, and a fidelity-budget search calibrates several plans.
    """
    started = time.perf_counter()
    ridge = float(getattr(config, "calib_ridge", None) or DEFAULT_RIDGE)
    # data-aware kept channels unless asked otherwise or the plan was given by the user
    # (--plan-in is applied as decided; only its weights are refit)
    data_mode = _mode(config, "calib_selection", ("data", "weights")) == "data"
    select = data_mode and getattr(config, "plan", None) is None
    if feeds is None:
        notes = []
        feeds = load_calibration_inputs(config.calib, model, getattr(config, "calib_size", None), notes)
    notes = list(notes or [])
    batch, unit, feeds = batch_size(model, feeds, notes)
    fit, held = split_holdout(feeds, unit, getattr(config, "calib_holdout_divisor", None))
    layers = ordered_layers(model, plan)
    uncalibrated = masked_model(model, plan)  # the plan's own (weight-only) kept kernels
    work, skipped = masked_copy(model, layers)

    followers = dense_followers(model, layers) if _mode(config, "calib_layers", ("all", "pruned")) == "all" else []
    steps = sorted(layers + followers, key=lambda step: step[0])
    following = {node.name for _, node, _ in followers}
    fixed = set(getattr(config, "fixed_channels", ()))  # channels decided for a coupled group (coupled.py)
    residual = _mode(config, "calib_target", ("residual", "output")) == "residual"
    partners = residual_partners(model, steps) if residual else {}

    dense_index = GraphIndex(model.graph)  # the unmasked kernels: the refit's prior (refit_layer)
    original, pruned = Stream(model, fit, batch), Stream(work, fit, batch)
    entries = []
    decided: dict[str, LayerPlan] = {}  # planned Conv -> its layer with the channels selection chose
    for i, (position, node, layer) in enumerate(steps):
        if progress is not None:
            progress.layer(i, len(steps), node.name)
        pruned_now = pruned.advance(position)
        x = pruned_now[node.input[0]]
        original_now = original.advance(position + 1, keep=(node.output[0],))
        y = original_now[node.output[0]]
        partner = partners.get(node.name)
        if partner is not None and original_now[partner].shape != y.shape:
            partner = None  # a broadcasting Add: keep the plain target
        if partner is not None:  # the Add's output is what the rest of the network sees
            y = y + (original_now[partner] - pruned_now[partner])
        if node.name in skipped:
            entries.append({"name": node.name, "refit": False, "reason": skipped[node.name]})
            continue
        # One BLAS thread: on a shared machine a second OpenBLAS thread waiting for a busy core
        # made the Gram products ~20x slower (measured 4 vs 119 GFLOP/s under load).
        with threadpool_limits(limits=1, user_api="blas"):
            # the node of ``work`` (same position), so a bias input added there stays in ``work``
            if node.op_type == "Gemm":
                entries.append(refit_gemm(work, work.graph.node[position], layer, x, y, ridge))
            else:
                # a layer the data could choose for (here or in the run whose plan is replayed):
                # its moments cover every input channel, in both runs alike
                choosable = data_mode and node.name not in following and node.name not in fixed \
                    and not is_disjoint(layer)
                entry, chosen = refit_layer(work, work.graph.node[position], layer, x, y, ridge,
                                            select and choosable, dense_index.constant(node.input[1]), choosable)
                entries.append(entry)
                if chosen is not layer and node.name not in following:
                    decided[node.name] = chosen
        entries[-1]["pruned"] = node.name not in following
        entries[-1]["target"] = f"output + residual error of {partner!r}" if partner else "output"
    if progress is not None and steps:
        progress.layer(len(steps), len(steps), "")
    del original, pruned

    report = {
        "samples": count(feeds), "fit_samples": count(fit), "held_out_samples": count(held),
        "source": config.calib if isinstance(config.calib, str) else "in-memory arrays",
        "conversions": notes, "ridge": ridge,
        "kernel_selection": ("per group, the lower refit error of the plan's weight-only choice and a data-aware "
                             "greedy choice" if select else "weight-only grouped-kernel rule of the plan (paper)"),
        "layers": entries,
        "fidelity": fidelity(model, uncalibrated, work, held if count(held) else fit, batch),
    }
    report["fidelity"]["on"] = HELD_OUT if count(held) else "fit samples (too few to hold out)"
    report["wall_s"] = round(time.perf_counter() - started, 3)
    if decided:
        plan = replace(plan, layers=[decided.get(layer.node, layer) for layer in plan.layers])
    return Calibrated(work, plan, report)


def refit_gemm(work: onnx.ModelProto, node: onnx.NodeProto, layer: LayerPlan, x: np.ndarray, y: np.ndarray,
               ridge: float) -> dict:
    """Refit a dense Gemm head in place: the same ridge least squares as a 1×1 Conv."""
    if x.ndim != 2 or y.ndim != 2:
        return {"name": node.name, "refit": False, "reason": "Gemm input is not a 2-D matrix"}
    index = GraphIndex(work.graph)
    weight = index.constant(node.input[1])
    trans_b = get_attr(node, "transB", 0)
    w4 = gemm_as_conv_weight(node, weight)
    bias = layer_bias(index, node, layer.c_out, weight.dtype)
    geo = ConvGeometry((1, 1), (1, 1), (1, 1), (0, 0, 0, 0))
    new_w, new_b, entry, _ = refit_weights(layer, w4, bias, x[:, :, None, None], y[:, :, None, None], geo, ridge,
                                           False)
    new_w = new_w[:, :, 0, 0]
    set_initializer(work.graph, node.input[1], np.ascontiguousarray(new_w if trans_b else new_w.T))
    _write_bias(work, index, node, new_b)
    return {"name": node.name, **entry}


def _mode(config, name: str, choices: tuple[str, ...]) -> str:
    """``config.<name>`` (the first choice, the default, when unset), checked against ``choices``."""
    mode = getattr(config, name, None) or choices[0]
    if mode not in choices:
        raise UserError(f"{name} must be one of {', '.join(map(repr, choices))}, got {mode!r}")
    return mode


# -- statistics and refit -------------------------------------------------------------------


def refit_layer(work: onnx.ModelProto, node: onnx.NodeProto, layer: LayerPlan, x: np.ndarray,
                y: np.ndarray, ridge: float, select: bool = False,
                dense_weight: np.ndarray | None = None, all_channels: bool | None = None) -> tuple[dict, LayerPlan]:
    """Refit one planned Conv of ``work`` in place from its input ``x`` and target ``y``
    -> (report entry, the layer as decided).

    With ``select``, each group also tries the kept channels a data-aware greedy search picks
    (``greedy_channels``) and keeps whichever set refits with the lower error; the returned layer
    is then a new ``LayerPlan`` with those channels (``layer`` itself is never edited, and is
    returned as it is when no group changed). Without it the plan's weight-only choice is kept.
    ``work`` is edited in place: it is calibrate's own copy, built up layer by layer.
    ``dense_weight``: the layer's kernels before masking, the prior every kept set is refit
    towards. Without it the masked weight in ``work`` is used, whose zeroed columns would make
    the prior of a channel the data chose but the plan's rule dropped zero instead of its
    original kernel (and a replayed plan, which masks the data's choice, refit differently).
    """
    index = GraphIndex(work.graph)
    weight = index.constant(node.input[1]) if dense_weight is None else dense_weight
    bias = layer_bias(index, node, layer.c_out, weight.dtype)
    geo = ConvGeometry.of(node, weight.shape[2:], x.shape[2:])
    new_w, new_b, entry, chosen = refit_weights(layer, weight, bias, x, y, geo, ridge, select,
                                                select if all_channels is None else all_channels)
    set_initializer(work.graph, node.input[1], new_w)
    _write_bias(work, index, node, new_b)
    return {"name": node.name, **entry}, chosen


def refit_weights(layer: LayerPlan, weight: np.ndarray, bias: np.ndarray, x: np.ndarray, y: np.ndarray,
                  geo: "ConvGeometry", ridge: float, select: bool,
                  all_channels: bool | None = None) -> tuple[np.ndarray, np.ndarray, dict, LayerPlan]:
    """(new weight, new bias, report entry, decided layer) for a Conv-shaped layer (weight
    [c_out, c_in, kh, kw]). The decided layer is ``layer`` when every group kept the plan's
    channels, else a new ``LayerPlan`` (``decided_layer``); ``layer`` is not edited.

    The last 1/8 of the samples validates the ridge strength and the choice of kept channels
    before the final fit on all rows, so neither is picked by how well it overfits.
    """
    kh, kw = weight.shape[2:]
    k2 = kh * kw
    # ``all_channels`` (default: ``select``): the moments of every input channel, for a layer the
    # data could choose for even when it does not (a replayed plan, --plan-in), so the replay
    # solves from bit-identical moments and reproduces the run that wrote it (moments over the kept
    # channels only differ in round-off, which the ridge validation can turn into another choice);
    # other layers (weight selection, Gemm readers of a flattened map) only their kept channels
    if select if all_channels is None else all_channels:
        channels = np.arange(layer.c_in, dtype=np.int64)
    else:
        channels = np.array(sorted({c for kept in layer.kept_in_channels for c in kept}), dtype=np.int64)
    split = len(x) - len(x) // HOLDOUT_DIVISOR
    m_train = accumulate(x[:split], y[:split], channels, geo)
    m_val = accumulate(x[split:], y[split:], channels, geo) if split < len(x) else None
    m = m_train + m_val if m_val is not None else m_train
    if m_val is None:
        m_train = None  # too few inputs to hold any out: fit and compare on all rows
    column = {int(c): i for i, c in enumerate(channels)}
    new_w = np.zeros(weight.shape, dtype=np.float64)
    new_b = bias.astype(np.float64).copy()
    before = after = 0.0
    per = layer.filters_per_group
    final = [list(planned) for planned in layer.kept_in_channels]  # per group, the channels kept
    data_groups, lams = 0, []
    greedy = "greedy" if layer.groups * len(layer.kept_in_channels[0]) * len(channels) ** 2 * k2 ** 3 <= GREEDY_BUDGET \
        else "one-shot"
    for g, planned in enumerate(layer.kept_in_channels):
        rows = np.asarray(layer.filter_order[g * per:(g + 1) * per], dtype=np.int64)
        w_full = weight[rows].astype(np.float64).reshape(len(rows), layer.c_in, k2)
        b0 = bias[rows].astype(np.float64)
        candidates = [list(planned)]
        if select:
            chosen = greedy_channels(m if m_train is None else m_train, rows, k2, len(planned), ridge,
                                     greedy == "greedy", chunk=max(1, len(channels) // GREEDY_STEPS))
            if chosen != candidates[0]:
                candidates.append(chosen)
        best = None
        for kept in candidates:
            idx = np.concatenate([np.arange(column[c] * k2, (column[c] + 1) * k2) for c in kept])
            w0 = w_full[:, kept].reshape(len(rows), -1).T
            fit = fit_group(m, m_train, m_val, idx, rows, w0, b0, ridge)
            if best is None or fit[4] < best[1][4]:
                best = (kept, fit, best[1][2] if best else fit[2])
        kept, (w, b, _, e1, _, lam), e0 = best  # e0: plain pruning with the plan's own choice
        if kept != list(planned):
            data_groups += 1
            final[g] = [int(c) for c in kept]
        before, after = before + e0, after + e1
        lams.append(lam)
        new_w[np.ix_(rows, kept)] = w.T.reshape(len(rows), len(kept), kh, kw)
        new_b[rows] = b
    energy = max(float(m.yy.sum()), 1e-30)
    if not select:
        selection = "weight-only (plan)"
    else:
        selection = f"data-aware ({greedy}) in {data_groups} of {layer.groups} groups, weight-only (plan) in the rest"
    entry = {"refit": True, "selection": selection, "data_selected_groups": data_groups,
             "rows": int(m.n), "columns": int(len(channels) * k2), "validated": m_val is not None,
             "ridge": float(np.median(lams)),
             "rel_mse_pruned": before / energy, "rel_mse_refit": after / energy}
    return new_w.astype(weight.dtype), new_b.astype(weight.dtype), entry, decided_layer(layer, final, data_groups)


def decided_layer(layer: LayerPlan, kept: list[list[int]], data_groups: int) -> LayerPlan:
    """``layer`` with the kept channels per group that calibration chose, and the provenance of
    that choice; ``layer`` itself when no group changed (``data_groups == 0``).

    Why a new object: the input plan stays what the planner (or the user) decided, so a caller
    that compares plans, retries, or reports both sees each stage's decision separately."""
    if not data_groups:
        return layer
    channels = "calibration: data-aware greedy selection (lower refit error than the weight rule)"
    if data_groups < layer.groups:
        channels = (f"{channels} in {data_groups} of {layer.groups} groups; "
                    f"{layer.provenance.get('channels', 'the plan')} in the others")
    return replace(layer, kept_in_channels=kept, provenance={**layer.provenance, "channels": channels})


def _write_bias(work: onnx.ModelProto, index: GraphIndex, node: onnx.NodeProto, bias: np.ndarray) -> None:
    """Write the refit bias; a layer without one (or sharing one) gets a new initializer."""
    name = bias_name(node)
    if not name or index.use_count(name) > 1 or index.constant(name) is None:
        name = NameAllocator(work.graph).new(f"{node.name}.bias")
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = name
    set_initializer(work.graph, name, bias)
