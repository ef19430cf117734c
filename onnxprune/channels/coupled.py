"""Coupled-channel narrowing (``--coupled-rate``): residual streams, Concat/Split and SE groups.

Why: the single-Conv planner narrows a Conv's input and folds the selection into a *private*
producer; a channel written by several Convs (a residual stream), read by several Convs, glued by
Concat or gated by an SE block stays full width, and that is where Torch-Pruning's outputs win at
equal MACs. ``channel_groups`` finds which channels must go together and ``prune_groups`` removes
them exactly; this module decides *which* groups and channels, and fits that decision into the
rest of the pass without a second calibration or verification path.

How, in four steps (each a plain function of plain data):
1. ``choose``: every prunable group that the single-Conv planner cannot narrow (more than one
   producer or more than one consumer; a private chain is left to it) and whose readers are all
   plain Convs loses ``rate`` of its channels, kept count aligned to the provider's block
   (``latency.profile(provider).align``) and at least one block; ``--min-channels`` applies to the
   groups as to single Convs (``dense_reader``: no group is cut whose Conv reader the single-Conv
   rules leave dense). Channels are ranked by a
   data-free importance: for every producer the squared norm of the channel's filter (+ bias),
   for every consumer the squared norm of the weights reading it, each divided by that layer's
   mean so wide and narrow layers count alike; the highest sum is kept (ties: lower index).
   With calibration data the score is what removing the channel changes where it is read: for
   every reader, its weight norm on the channel times the channel's mean squared input (the
   channel's share of the reader's output energy, ignoring correlations), again per-layer
   normalised and summed; writers' filters are not scored (a large pre-activation a ReLU clips
   is no reason to keep a channel).
   Groups left alone are listed with the reason.
2. The single-Conv planner then plans the *narrowed* model (``CoupledPlan.narrowed``: shapes,
   MACs and costs as they will be), with the groups' consumers excluded (their input is the
   group's choice) and their producers limited to G=1 (a grouped layer's equal filter groups
   cannot lose arbitrary filters).
3. ``lift``: that plan is re-expressed on the dense (normalized) model: producers get back their
   dropped filters (never read: see 4), and every consumer gets a G=1 ``LayerPlan`` keeping the
   group's channels. So calibration refits the consumers against the dense model's outputs like
   any pruned layer (their channels fixed: ``fixed_channels``), and ``verify.masked_model`` of this
   plan — consumers' dropped columns zeroed — is the exactness reference: a dropped channel is then
   computed but read by no one, which is what removing it computes.
4. ``lower``: after calibration the groups are removed physically (``prune_channel_groups`` on the
   calibrated model) and the plan is mapped onto the narrowed graph for the rewrite: consumers'
   layers disappear (their columns are gone), producers' filter orders lose the dropped filters.
Groups are matched between model versions by their members (tensor, offset), never by position.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from ..ir.analysis import find_prunable_convs, foldable_producer
from .channel_groups import ChannelAnalysis, ChannelGroup, channel_groups
from ..errors import InternalError, UserError
from ..ir.graph import GraphIndex, get_attr
from ..planning.plan import LayerPlan, Plan
from .prune_groups import prune_channel_groups
from ..calibration.refit_steps import gemm_as_conv_weight, refittable_gemm
from ..planning.speed_plan import align_channels

PROVENANCE_PREFIX = "coupled channel group:"  # every coupled reader's structure provenance starts so
STRUCTURE = f"{PROVENANCE_PREFIX} --coupled-rate of the group's channels, provider-aligned"
CHANNELS = "coupled channel group: data-free importance (filter and reader weight norms, summed)"
CHANNELS_DATA = ("coupled channel group: calibration importance (each reader's weight norm x the channel's "
                 "mean squared input, summed)")
ENERGY_SAMPLES = 64  # calibration inputs the channel energies are measured on (dense model)
PRIVATE = "a private chain (one producer, one reader): the single-Conv planner narrows it"


@dataclass(frozen=True)
class CoupledCut:
    """One group narrowed: group channel i is channel offset + i of every member tensor."""

    members: tuple[tuple[str, int], ...]
    width: int
    kept: tuple[int, ...]
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    importance: str = CHANNELS

    def record(self) -> dict:
        """The cut as a plan records it (``Plan.coupled``)."""
        return {"members": [list(m) for m in self.members], "width": self.width, "kept": list(self.kept)}

    def as_dict(self) -> dict:
        return {"members": [list(m) for m in self.members], "width_before": self.width,
                "width_after": len(self.kept), "producers": list(self.producers),
                "consumers": list(self.consumers), "importance": self.importance}


@dataclass
class CoupledPlan:
    rate: float | str  # a fraction, or "auto" (widths chosen per group by the fidelity planner)
    align: int
    cuts: list[CoupledCut]
    left: list[dict]  # groups not narrowed: {"members", "width", "reason"}
    narrowed: onnx.ModelProto | None = None  # the model with the cuts applied (planning only)
    notes: list[str] = field(default_factory=list)
    # tensor -> its kept channels, for every tensor the cuts narrow; the same in every version of
    # the model (``keep`` matches groups by members), so computed once, by ``choose``
    kept_tensors: dict[str, np.ndarray] = field(default_factory=dict)
    candidates: list[dict] = field(default_factory=list)  # auto mode: every group's offered cuts

    @property
    def consumers(self) -> set[str]:
        return {name for cut in self.cuts for name in cut.consumers}

    @property
    def producers(self) -> set[str]:
        return {name for cut in self.cuts for name in cut.producers}

    def keep(self, analysis: ChannelAnalysis) -> dict[int, list[int]]:
        """Group id in ``analysis`` (of any version of the model) -> kept channels."""
        by_members = {g.members: g for g in analysis.groups}
        keep = {}
        for cut in self.cuts:
            group = by_members.get(cut.members)
            if group is None or group.width != cut.width or not group.prunable:
                raise InternalError(f"coupled group at {cut.members[0]} is not the same in this model version")
            keep[group.id] = list(cut.kept)
        return keep

    def apply(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """``model`` (a version of the model ``choose`` saw) with the cut channels removed."""
        analysis = channel_groups(model)
        return prune_channel_groups(model, self.keep(analysis), analysis)

    def importance_of(self, reader: str) -> str:
        return next(cut.importance for cut in self.cuts if reader in cut.consumers)

    def as_dict(self) -> dict:
        data = {"rate": self.rate, "align": self.align, "groups": [cut.as_dict() for cut in self.cuts],
                "left_alone": self.left, "notes": self.notes}
        if self.candidates:
            data["candidates"] = self.candidates
        return data


def choose(model: onnx.ModelProto, rate: float, align: int, exclude=(), feeds: dict | None = None,
           also_in=(), min_channels: int | None = None) -> CoupledPlan:
    """Step 1 (see the module docstring) on ``model`` (normalized); ``feeds``: calibration inputs;
    ``also_in``: other versions of the model (e.g. with its own symbolic input dims) in which a
    group must be found identically to be cut — a tie can depend on a spatial size (an
    AveragePool that makes a 1×1 map at one input size only); ``min_channels``: see ``eligible``."""
    if not 0.0 < rate < 1.0:
        raise UserError(f"--coupled-rate must be in (0, 1), got {rate}")
    found = eligible(model, align, exclude, also_in, min_channels)
    ranked = rank_channels(model, found.candidates, feeds)
    kept = {}
    for group in found.candidates:
        kept_count = align_channels((1.0 - rate) * group.width, align, group.width)
        if kept_count >= group.width:  # eligible groups are wider than a block: always reported
            found.left.append({"members": [list(m) for m in group.members[:3]], "width": group.width,
                               "reason": f"too narrow to lose a {align}-channel block"})
            continue
        kept[group.members] = ranked[group.members][:kept_count]
    return plan_cuts(model, found, kept, rate, align, CHANNELS_DATA if feeds else CHANNELS)


@dataclass
class Eligible:
    """The groups of one model that can be narrowed, and why the others cannot."""

    analysis: ChannelAnalysis
    candidates: list[ChannelGroup]  # every narrowable group
    left: list[dict]


def eligible(model: onnx.ModelProto, align: int, exclude=(), also_in=(), min_channels: int | None = None) -> Eligible:
    """Every group ``choose`` may narrow (see its docstring), with the reasons for the rest.
    ``min_channels``: ``--min-channels``, applied by ``dense_reader`` (None: not applied here —
    a replayed plan's groups, and ``--coupled-rate auto``, whose candidates
    ``coupled_candidates.group_candidates`` checks against the planner's own layers)."""
    analysis = channel_groups(model)
    stable = [{g.members for g in channel_groups(other).groups if g.prunable} for other in also_in]
    index = GraphIndex(model.graph)
    nodes = {n.name: n for n in model.graph.node}
    excluded = set(exclude)
    dense = {}
    if min_channels is not None:
        dense = {s.name: s.reason for s in find_prunable_convs(model, lambda info: 1, min_channels, exclude)[1]}
    candidates, left = [], []
    for group in analysis.groups:
        reason = _why_not(group, nodes, index, excluded) or dense_reader(group, dense.get)
        if not reason and any(group.members not in found for found in stable):
            reason = "its channel ties depend on the input's spatial size (they differ at the model's own input dims)"
        if not reason and group.width <= align:
            reason = f"too narrow to lose a {align}-channel block"
        if reason:
            if group.width >= align:  # tiny groups (a scalar gate, an RGB input) are noise in a report
                left.append({"members": [list(m) for m in group.members[:3]], "width": group.width,
                             "reason": reason})
            continue
        candidates.append(group)
    return Eligible(analysis, candidates, left)


def rank_channels(model: onnx.ModelProto, groups: list[ChannelGroup], feeds: dict | None) -> dict[tuple, list[int]]:
    """Group members -> the group's channels, most important first (see the module docstring,
    step 1); the kept channels of any width are a prefix of this order."""
    index = GraphIndex(model.graph)
    nodes = {n.name: n for n in model.graph.node}
    energy = _channel_energy(model, groups, nodes, feeds) if feeds and groups else None
    return {g.members: [int(c) for c in np.argsort(-_importance(g, nodes, index, energy), kind="stable")]
            for g in groups}


def plan_cuts(model: onnx.ModelProto, found: Eligible, kept: dict[tuple, list[int]], rate, align: int,
              importance: str) -> CoupledPlan:
    """The CoupledPlan removing, from each group in ``kept`` (by members), all but those channels."""
    cuts = []
    for group in found.candidates:
        if group.members in kept:
            channels = tuple(sorted(int(k) for k in kept[group.members]))
            cuts.append(CoupledCut(group.members, group.width, channels, group.producers, group.consumers,
                                   importance))
    plan = CoupledPlan(rate, align, cuts, found.left)
    if cuts:
        keep = plan.keep(found.analysis)
        plan.kept_tensors = found.analysis.kept_channels(keep)
        plan.narrowed = prune_channel_groups(model, keep, found.analysis)
    else:
        plan.notes.append("no coupled channel group could be narrowed")
    return plan


def dense_reader(group: ChannelGroup, dense_reason) -> str:
    """``--min-channels`` for a coupled group — the one rule both modes apply (``eligible``, and
    ``coupled_candidates.group_candidates`` for ``--coupled-rate auto``): why the group is not
    cut, or ''.

    A group's cut prunes the input channels of every reader, as a single-Conv cut prunes its
    Conv's, so it is made only where the single-Conv rules would prune each Conv reader
    (``analysis.find_prunable_convs``: at least ``min_channels`` input and output channels in the
    dense model). The writers are not checked, as a single-Conv cut's foldable producer is not
    (an RGB stem's unread filters are dropped): a writer only loses filters no reader reads any
    more. Like a single-Conv cut's width, the group's kept width is not bounded by
    ``--min-channels`` (one provider block at least). Gemm readers are no Convs: not checked.
    ``dense_reason(conv)``: why the single-Conv rules leave that Conv dense, '' or None if they
    do not."""
    for name in group.consumers:
        reason = dense_reason(name)
        if reason:
            return f"read by Conv {name!r}, which the single-Conv rules leave dense: {reason}"
    return ""


def _why_not(group: ChannelGroup, nodes: dict, index: GraphIndex, excluded: set) -> str:
    offsets = dict(group.members)
    if group.frozen_by:
        node, op, reason = group.frozen_by[0]
        return f"frozen by {op} {node!r}: {reason}"
    if not group.producers:
        return "no producer (its channels come from a constant)"
    if len(group.producers) == 1 and len(group.consumers) <= 1 and (
            not group.consumers or foldable_producer(index, group.consumers[0]) == group.producers[0]):
        return PRIVATE
    if excluded & (set(group.producers) | set(group.consumers) | set(group.passthrough)):
        return "a writer, reader or pass-through op of the group is excluded (--exclude)"
    for name in group.consumers:
        node = nodes[name]
        weight = index.constant(node.input[1]) if len(node.input) > 1 else None
        if node.op_type == "Conv" and get_attr(node, "group", 1) == 1 and weight is not None and weight.ndim == 4:
            continue
        if refittable_gemm(node, weight, index) and node.input[0] in offsets:
            continue
        return f"read by {node.op_type} {name!r} (only plain Convs and Gemms reading channels 1:1 can be refit yet)"
    for name in group.producers:
        node = nodes[name]
        if node.op_type != "Conv" or get_attr(node, "group", 1) != 1:
            return f"written by {node.op_type} {name!r} (only plain Convs can be narrowed as writers yet)"
    return ""


def _importance(group: ChannelGroup, nodes: dict, index: GraphIndex, energy: dict | None) -> np.ndarray:
    """Per group channel: Σ over writers and readers of the channel's magnitude / that layer's mean
    (see the module docstring, step 1)."""
    offsets: dict[str, list[int]] = {}
    for tensor, offset in group.members:  # a tensor may hold the group twice (Concat([x, x]))
        offsets.setdefault(tensor, []).append(offset)
    score = np.zeros(group.width)
    for name in group.producers if energy is None else ():
        node = nodes[name]
        weight = index.constant(node.input[1]).astype(np.float64)
        magnitude = (weight.reshape(weight.shape[0], -1) ** 2).sum(1)
        if len(node.input) > 2 and node.input[2]:
            magnitude = magnitude + index.constant(node.input[2]).astype(np.float64) ** 2
        for start in offsets[node.output[0]]:
            score += magnitude[start:start + group.width] / max(magnitude.mean(), 1e-30)
    for name in group.consumers:
        node = nodes[name]
        magnitude = reader_channel_energy(node, index)
        if energy is not None:
            magnitude = magnitude * energy[node.input[0]]
        for start in offsets[node.input[0]]:
            score += magnitude[start:start + group.width] / max(magnitude.mean(), 1e-30)
    return score


def reader_channel_energy(node: onnx.NodeProto, index: GraphIndex) -> np.ndarray:
    """Per input channel of a group's reader (a Conv, or a Gemm read as a 1×1 Conv): the squared
    norm of the weights that read it — the importance's and the auto mode's proxy's one measure."""
    weight = index.constant(node.input[1]).astype(np.float64)
    if node.op_type == "Gemm":
        weight = gemm_as_conv_weight(node, weight)
    return (np.moveaxis(weight, 1, 0).reshape(weight.shape[1], -1) ** 2).sum(1)


def _channel_energy(model: onnx.ModelProto, groups, nodes: dict, feeds: dict) -> dict[str, np.ndarray]:
    """Mean square per channel of every tensor the candidate groups' readers read, over the first
    ``ENERGY_SAMPLES`` calibration inputs, in the dense model."""
    from ..calibration.calib_stream import batch_size
    from ..checks.runtime import create_session

    tensors = sorted({nodes[name].input[0] for group in groups for name in group.consumers})
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    listed = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                              for t in tensors if t not in listed)
    batch, _, feeds = batch_size(model, {k: v[:ENERGY_SAMPLES] for k, v in feeds.items()}, [])
    sess = create_session(probe)
    total = dict.fromkeys(tensors, 0.0)
    count = len(next(iter(feeds.values())))
    for start in range(0, count, batch):
        values = sess.run(tensors, {k: v[start:start + batch] for k, v in feeds.items()})
        for name, value in zip(tensors, values):
            value = value.astype(np.float64)
            axes = tuple(a for a in range(value.ndim) if a != 1)
            total[name] = total[name] + (value ** 2).mean(axis=axes) * len(value)
    return {name: value / max(count, 1) for name, value in total.items()}


def lift(narrow_plan: Plan, coupled: CoupledPlan, dense: onnx.ModelProto) -> Plan:
    """Step 3: ``narrow_plan`` (made on ``coupled.narrowed``) + the consumers' layers, on ``dense``."""
    dense_index = GraphIndex(dense.graph)
    kept_out = coupled.kept_tensors
    planned = narrow_plan.by_node()
    layers = []
    for node in dense.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        weight = dense_index.constant(node.input[1]) if len(node.input) > 1 else None
        if node.name in coupled.consumers:
            kept = kept_out.get(node.input[0])
            if node.op_type == "Gemm":
                weight = gemm_as_conv_weight(node, weight)
            layers.append(LayerPlan(
                node.name, node.input[1], int(weight.shape[0]), int(weight.shape[1]),
                [int(k) for k in weight.shape[2:]], 1, list(range(int(weight.shape[0]))), [[int(k) for k in kept]],
                provenance={"structure": AUTO_STRUCTURE if coupled.rate == "auto" else STRUCTURE,
                            "channels": coupled.importance_of(node.name),
                            "kept_fraction": round(len(kept) / int(weight.shape[1]), 4)}))
            continue
        layer = planned.get(node.name)
        if layer is None:
            continue
        rows = kept_out.get(node.output[0])
        if rows is not None:  # a producer: its dropped filters come back, read by no one
            if layer.groups != 1:
                raise InternalError(f"{node.name} writes a coupled group but was planned with G={layer.groups}")
            order = [int(rows[f]) for f in layer.filter_order]
            taken = set(order)
            order += [f for f in range(int(weight.shape[0])) if f not in taken]
            layer = replace(layer, c_out=int(weight.shape[0]), filter_order=order)
        layers.append(replace(layer, weight=node.input[1]))
    skipped = []
    for entry in narrow_plan.skipped:
        if entry["node"] in coupled.consumers:
            continue  # a reader's cut is the group's: it is in ``layers``
        if entry["node"] in coupled.producers:  # planned narrowed: say how (the reason's counts are the narrowed ones)
            node = next(n for n in dense.graph.node if n.name == entry["node"])
            rows, weight = kept_out.get(node.output[0]), dense_index.constant(node.input[1])
            change = "" if rows is None or weight is None else f": C_out {int(weight.shape[0])} -> {len(rows)}"
            entry = {**entry, "reason": f"{entry['reason']} (after the coupled cut{change})"}
        skipped.append(entry)
    return Plan(layers, skipped, narrow_plan.options)


def lower(dense_plan: Plan, coupled: CoupledPlan, dense: onnx.ModelProto, narrowed: onnx.ModelProto) -> Plan:
    """Step 4: ``dense_plan`` (on ``dense``) mapped onto ``narrowed`` = ``coupled.apply(dense)``."""
    kept_out = coupled.kept_tensors
    nodes = {n.name: n for n in narrowed.graph.node}
    dense_nodes = {n.name: n for n in dense.graph.node}
    layers = []
    for layer in dense_plan.layers:
        if layer.node in coupled.consumers:
            continue
        node = nodes[layer.node]
        rows = kept_out.get(dense_nodes[layer.node].output[0])
        if rows is not None:
            position = {int(r): i for i, r in enumerate(rows)}
            order = [position[f] for f in layer.filter_order if f in position]
            layer = replace(layer, c_out=len(rows), filter_order=order)
        layers.append(replace(layer, weight=node.input[1]))
    return Plan(layers, dense_plan.skipped, dense_plan.options)


def check_options(config) -> None:
    """--coupled-rate's option errors, before any work (a no-op without --coupled-rate)."""
    rate = config.coupled_rate
    if rate in (None, "auto", "off"):  # auto: offered where the fidelity planner plans, else off
        return
    if isinstance(rate, str):
        raise UserError(f"--coupled-rate must be a fraction in (0, 1), 'auto' or 'off', got {rate!r}")
    if not 0.0 < rate < 1.0:
        raise UserError(f"--coupled-rate must be in (0, 1), got {rate}")
    if config.plan is not None or config.groups != "auto" or config.tickets:
        raise UserError("--coupled-rate R works with --groups auto only (not with --plan-in, --groups N or --tickets)")
    if config.target_speedup is not None:
        raise UserError("--coupled-rate R does not take --target-speedup (the planner does not see its cut); give "
                        "--target-macs, or --coupled-rate auto")


AUTO_STRUCTURE = (f"{PROVENANCE_PREFIX} width chosen by the fidelity planner (knapsack with the single-Conv "
                  "cuts; --coupled-rate auto)")


def prepare(model: onnx.ModelProto, symbolic: onnx.ModelProto, config, feeds: dict | None, progress):
    """``--coupled-rate R``: choose the groups to narrow -> (CoupledPlan, model to plan the rest on,
    its config). (``auto`` is chosen with the single-Conv cuts: ``from_allocation``.)

    ``symbolic``: ``model`` with the input's own dims, where the rewrite finds the groups again.
    The options were checked by ``check_options`` before any work (``pipeline.prune``)."""
    from ..ir.macs import count_macs
    from ..planning.latency import profile

    progress.stage("narrowing coupled channel groups (residual streams, Concat/Split, SE gates)")
    coupled = choose(model, config.coupled_rate, profile(config.provider).align, config.exclude, feeds, [symbolic],
                     config.min_channels)
    if coupled.narrowed is None:
        return coupled, model, config
    kept = count_macs(coupled.narrowed)[0] / max(1, count_macs(model)[0])
    coupled.notes.append(f"the coupled cut alone keeps x{kept:.4f} of the MACs; the planner's numbers in 'auto' "
                         f"are relative to the narrowed model")
    target = config.target_macs
    if target is not None:  # the planner's target is relative to the narrowed model
        if kept <= target:
            note = (f"the coupled cut alone keeps x{kept:.3f} of the MACs, at or below --target-macs {target:g}: "
                    f"no single-Conv cut is added (a lower --coupled-rate gets closer to the target)")
            coupled.notes.append(note)
            progress.stage(note)
        target = min(1.0, target / kept)
        coupled.notes.append(f"single-Conv planner target on the narrowed model: {target:.4f} of its MACs")
    return coupled, coupled.narrowed, replace(narrowing_config(config, coupled), target_macs=target)


REPLAYED = "--plan-in (the coupled group's kept channels as the plan records them)"


def from_records(model: onnx.ModelProto, symbolic: onnx.ModelProto, plan: Plan, config) -> CoupledPlan:
    """The coupled cuts ``plan`` records (``Plan.coupled``) on ``model``. A group that is not one
    this model can narrow (another model, an edited plan), a group recorded twice, or a reader
    whose layer in the plan does not keep exactly the group's kept channels (G=1) is a user
    error: the rewrite would not compute what the plan says."""
    found = eligible(model, 1, config.exclude, [symbolic])
    by_members = {group.members: group for group in found.candidates}
    kept = {}
    for record in plan.coupled:
        members = tuple((str(t), int(o)) for t, o in record["members"])
        group = by_members.get(members)
        if group is None or group.width != record["width"]:
            raise UserError(f"the plan's coupled channel group at {members[0][0]!r} (width {record['width']}) is not "
                            f"one this model can narrow; was the plan made for another model?")
        if members in kept:
            raise UserError(f"the plan records the coupled channel group at {members[0][0]!r} twice")
        kept[members] = list(record["kept"])
    coupled = plan_cuts(model, found, kept, "plan-in", 1, REPLAYED)
    layers, nodes = plan.by_node(), {n.name: n for n in model.graph.node}
    for name in sorted(coupled.consumers):
        layer, expected = layers.get(name), [int(c) for c in coupled.kept_tensors[nodes[name].input[0]]]
        if layer is None or layer.groups != 1 or layer.kept_in_channels[0] != expected:
            what = "is missing" if layer is None else "does not keep exactly the group's channels with G=1"
            raise UserError(f"the plan's layer for {name!r}, a reader of a coupled channel group it records, {what}; "
                            f"the plan is inconsistent (edited?)")
    return coupled


def narrowing_config(config, coupled: CoupledPlan):
    """``config`` for planning the rest of ``coupled``'s model: the groups' readers are the groups'
    (excluded, channels fixed), their writers take G=1 cuts only."""
    readers = tuple(sorted(coupled.consumers))
    return replace(config, exclude=tuple(config.exclude) + readers, fixed_channels=readers,
                   g1_only=tuple(sorted(set(config.g1_only) | coupled.producers)))


def from_allocation(model: onnx.ModelProto, planner, speed_plan) -> CoupledPlan:
    """``--coupled-rate auto``: the CoupledPlan of the group cuts the fidelity planner chose with
    ``speed_plan`` (``planner``: that ``FidelityPlanner``, built with ``coupled_also_in``)."""
    kept = {group.members: list(cut.kept) for group, cut in speed_plan.groups}
    coupled = plan_cuts(model, planner.eligible, kept, "auto", planner.prof.align,
                        CHANNELS_DATA if planner.measured else CHANNELS)
    coupled.candidates = [group.as_dict() for group in planner.offered]
    if coupled.narrowed is not None:
        coupled.notes.append("group widths chosen by the fidelity planner with the single-Conv cuts (one knapsack); "
                             "its numbers in 'auto' are relative to the dense model")
    return coupled
