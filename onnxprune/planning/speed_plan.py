"""Speed-aware planning (``--groups auto``): choose groups G and kept channels n per layer.

Why a separate planner: the paper's fixed setting (G=8 everywhere) saves MACs but rarely time —
ONNX Runtime only runs a grouped Conv fast when its per-group channel counts are block-aligned,
grouped Convs with few filters per group run far below their FLOPs-ideal speed, and every Gather
costs a copy plus two layout reorders. See shared/notes/ort-cpu-grouped-conv.md and latency.py.

How it decides:
1. One global knob, a pruning rate r. At rate r every prunable layer aims to keep
   n = (1 − r)·C_in input channels, rounded to the provider's block size (16 on CPU).
2. Per layer, the candidates at that n are G=1 (every filter keeps the same channels), grouped
   G>1 with block-aligned filters per group (≥ the provider minimum), and disjoint groups
   (G·n = C_in: every input channel kept by exactly one group) when n is within one block of
   C_in/G. Their latency comes from the cost model, including the effects on neighbours: a G=1
   or disjoint layer fed by a foldable producer (``analysis.foldable_producer``) needs no Gather
   (the rewrite's fold rule, ``analysis.gather_folds``), and with G=1 the producer computes only
   the kept channels (its MACs drop too); otherwise a Gather is charged. The fastest candidate
   wins (disjoint groups win ties within 3%); a layer stays dense unless some candidate saves at
   least 2% of the time it and its neighbours take.
   Layers are visited in graph order, twice, so each sees its neighbours' final choices.
3. r is scanned on a fixed grid; the smallest r that meets the MACs target (and the speedup
   target, if any) is taken: the mildest pruning that gets there. Block rounding makes that
   overshoot, so layers then get one block of channels back at a time (the one costing the
   least time per MAC restored) while the target still holds. Without a target, the target
   is the MACs that plain ``--rate`` pruning of every prunable layer would leave.
4. If the predicted total is not below dense, everything stays dense: the planner never plans a
   slowdown it can foresee (``--check-speed`` measures the real thing).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from ..ir.analysis import find_prunable_convs, foldable_chain, gather_folds
from ..errors import UserError
from ..ir.graph import GraphIndex, get_attr
from .latency import ConvOp, GatherOp, Profile, load_cost_model, profile
from ..ir.macs import conv_macs

RATE_GRID = tuple(round(x, 3) for x in np.arange(0.0, 0.905, 0.01))
MIN_SAVING = 0.02  # a layer is pruned only if that saves >= 2% of its (and its neighbours') time
DISJOINT_PREFERENCE = 0.03  # disjoint groups win when within 3% of the fastest candidate
MACS_TOLERANCE = 0.005  # a target of keeping fraction F counts as met at <= F + 0.005
MAX_GROUPS = 16  # beyond 16 groups a layer has too few filters per group to be fast anywhere


@dataclass(frozen=True)
class Option:
    groups: int
    n_keep: int
    disjoint: bool = False

    def as_config(self) -> dict:
        config = {"groups": self.groups, "n_keep": self.n_keep}
        if self.disjoint:
            config["disjoint"] = True
        return config


@dataclass
class Layer:
    """A Conv of the model with the static shapes the cost model needs (batch 1)."""

    name: str
    c_in: int
    c_out: int
    groups: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    h_in: int
    w_in: int
    h_out: int
    w_out: int
    prunable: bool = False
    producer: str | None = None  # foldable producer Conv (rewrite drops the Gather / narrows it)
    consumer: str | None = None  # the pruned Conv this layer is the foldable producer of
    chain: tuple[str, ...] = ()  # depthwise Convs between producer and this layer (narrowed with it)
    narrowed_by: str | None = None  # for a depthwise Conv on such a chain: the consumer that narrows it
    g1_only: bool = False  # writes a coupled channel group (coupled.py): only G=1 cuts keep its filters free


@dataclass
class Outcome:
    """What a state of per-layer choices costs: predicted latency (µs) and MACs."""

    rate: float
    state: dict[str, Option]
    time_us: float
    macs: int


@dataclass
class SpeedPlan:
    configs: dict[str, dict]
    rate: float | None  # the speed planner's global rate; None for fidelity plans (no single rate)
    predicted_speedup: float
    macs_ratio: float
    dense_time_us: float
    time_us: float
    cost_source: str
    notes: list[str] = field(default_factory=list)
    groups: list = field(default_factory=list)  # coupled group cuts chosen with it: (GroupCandidates, GroupCut)


def describe(plan: SpeedPlan) -> str:
    readers = {name for group, _ in plan.groups for name in group.consumers}
    pruned = sum(1 for c in plan.configs.values() if "skip" not in c) + len(readers)
    total = len(set(plan.configs) | readers)
    how = f"rate {plan.rate:.2f}" if plan.rate is not None else "cuts chosen by fidelity cost"
    text = (f"auto: {how}, {pruned}/{total} layers pruned, MACs -"
            f"{100 * (1 - plan.macs_ratio):.1f}%, predicted speedup {plan.predicted_speedup:.2f}x "
            f"({plan.cost_source} cost model)")
    if plan.groups:
        widths = ", ".join(f"{group.width}->{len(cut.kept)}" for group, cut in plan.groups)
        text += (f"; {len(plan.groups)} coupled channel group{'s' if len(plan.groups) > 1 else ''} narrowed "
                 f"({widths}; {len(readers)} of the pruned Convs read them)")
    return "; ".join([text] + plan.notes)


def plan_speed(model: onnx.ModelProto, config, cost=None) -> SpeedPlan:
    """The search above; ``config`` is a PruneConfig (rate, provider, targets, latency_table...)."""
    _check_targets(config)
    cost = cost or load_cost_model(config.provider, config.latency_table)
    prof = profile(config.provider)
    layers, skipped, other_macs = collect_layers(model, config)
    planner = _Planner(layers, cost, prof, other_macs)
    dense = planner.evaluate(0.0, {})
    if not planner.order:
        return dense_plan(skipped, dense, getattr(cost, "source", "custom"))
    target = _macs_target(layers, config, dense.macs, other_macs)
    outcomes = [planner.plan_at(r) for r in RATE_GRID]
    chosen, notes = _pick(outcomes, dense, target, config.target_speedup)
    if target is not None and not notes:
        chosen = planner.relax(chosen, target * dense.macs, dense.time_us, config.target_speedup)
    configs = {name: {"skip": reason} for name, reason in skipped.items()}
    for layer in layers.values():
        if not layer.prunable:
            continue
        option = chosen.state.get(layer.name)
        configs[layer.name] = option.as_config() if option else {
            "skip": f"auto: no faster configuration on {config.provider} at rate {chosen.rate:.2f}"}
    speedup, macs_ratio = ratios(dense, chosen)
    return SpeedPlan(configs, chosen.rate, speedup, macs_ratio, dense.time_us, chosen.time_us,
                     getattr(cost, "source", "custom"), notes)


def ratios(dense: Outcome, outcome: Outcome) -> tuple[float, float]:
    """(predicted speedup, MACs ratio) of ``outcome`` over ``dense``.

    Why guarded: a model may have nothing the cost model can time (only Conv1D/Conv3D, weights
    computed by ops, initializers overridable as graph inputs, Convs without static shapes) or no
    countable MACs at all; its plan is the dense one, ratio 1, not a division by zero."""
    speedup = dense.time_us / outcome.time_us if outcome.time_us > 0 else 1.0
    macs_ratio = outcome.macs / dense.macs if dense.macs > 0 else 1.0
    return speedup, macs_ratio


def dense_plan(skipped: dict[str, str], dense: Outcome, cost_source: str) -> SpeedPlan:
    """The plan of a model with no Conv to choose for: everything dense, each Conv's reason kept."""
    note = "no Conv can be planned" + ("" if skipped else " (the model has no Conv)")
    return SpeedPlan({name: {"skip": reason} for name, reason in skipped.items()}, 0.0, 1.0, 1.0,
                     dense.time_us, dense.time_us, cost_source, [note])


def _check_targets(config) -> None:
    if config.target_macs is not None and not 0.0 < config.target_macs <= 1.0:
        raise UserError(f"--target-macs is the fraction of MACs to keep, in (0, 1]; got {config.target_macs}")
    if config.target_speedup is not None and not config.target_speedup > 0:
        raise UserError(f"--target-speedup must be positive, got {config.target_speedup}")


def _macs_target(layers: dict[str, Layer], config, dense_macs: int, other_macs: int) -> float | None:
    """Fraction of MACs to keep: --target-macs, else what plain --rate pruning leaves (if no speed target)."""
    if config.target_macs is not None:
        return float(config.target_macs)
    if config.target_speedup is not None:
        return None
    from ..gkp.kernel_selection import n_kept

    kept = other_macs
    for layer in layers.values():
        per_channel = _conv_macs(layer, layer.c_out, 1, layer.groups)  # MACs per kept input channel
        n = n_kept(layer.c_in, config.rate) if layer.prunable else layer.c_in // layer.groups
        kept += per_channel * n
    return kept / dense_macs if dense_macs > 0 else 1.0


def _pick(outcomes: list[Outcome], dense: Outcome, macs_target: float | None, speedup: float | None):
    """Smallest rate meeting the targets; else the deepest MACs cut that is still faster than dense."""
    def meets(o: Outcome) -> bool:
        ok = macs_target is None or o.macs <= (macs_target + MACS_TOLERANCE) * dense.macs
        return ok and (speedup is None or dense.time_us / o.time_us >= speedup)

    for outcome in outcomes:
        if meets(outcome) and outcome.time_us < dense.time_us:
            return outcome, []
    faster = [o for o in outcomes if o.time_us < dense.time_us] or [dense]
    best = min(faster, key=lambda o: (o.macs, o.time_us)) if macs_target is not None else \
        min(faster, key=lambda o: (o.time_us, o.macs))
    wanted = []
    if macs_target is not None:
        wanted.append(f"MACs x{macs_target:.3f}")
    if speedup is not None:
        wanted.append(f"speedup {speedup:g}x")
    return best, [f"target ({', '.join(wanted)}) not reachable without slowing layers down; "
                  f"closest faster plan used"]


def collect_layers(model: onnx.ModelProto, config) -> tuple[dict[str, Layer], dict[str, str], int]:
    """Every Conv with static shapes, which are prunable, and the MACs of everything else."""
    from ..ir.macs import count_macs
    from ..ir.shape_facts import static_shapes_at_batch_one

    index = GraphIndex(model.graph)
    shapes = static_shapes_at_batch_one(model)  # count_macs below reads the same (cached) facts
    prunable, skipped_convs = find_prunable_convs(model, lambda info: 1, config.min_channels, config.exclude)
    prunable_names = {info.name for info in prunable}
    g1_only = set(getattr(config, "g1_only", ()))
    skipped = {s.name: s.reason for s in skipped_convs}
    layers: dict[str, Layer] = {}
    for node in model.graph.node:
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            continue
        weight = index.constant(node.input[1]) if len(node.input) > 1 else None
        x, y = shapes.get(node.input[0]), shapes.get(node.output[0])
        if weight is None or weight.ndim != 4 or x is None or y is None or len(x) != 4 or len(y) != 4:
            if node.name in prunable_names:
                skipped[node.name] = "auto: spatial shape unknown (no static shapes)"
            continue
        groups = int(get_attr(node, "group", 1))
        strides = tuple(get_attr(node, "strides", [1, 1]))
        layers[node.name] = Layer(node.name, int(x[1]), int(weight.shape[0]), groups,
                                  (int(weight.shape[2]), int(weight.shape[3])), (int(strides[0]), int(strides[1])),
                                  int(x[2]), int(x[3]), int(y[2]), int(y[3]), prunable=node.name in prunable_names,
                                  g1_only=node.name in g1_only)
    for layer in layers.values():
        if layer.prunable:
            producer, chain = foldable_chain(index, layer.name)
            if producer in layers and layers[producer].consumer is None and all(d in layers for d in chain):
                layer.producer, layer.chain = producer, tuple(chain)
                layers[producer].consumer = layer.name
                for name in chain:
                    layers[name].narrowed_by = layer.name
    total, per_node = count_macs(model)
    conv_total = sum(per_node.get(name, 0) for name in layers)
    return layers, skipped, total - conv_total


def _conv_macs(layer: Layer, c_out: int, n_per_group: int, groups: int) -> int:
    del groups  # MACs per output channel depend only on the channels each filter reads
    return conv_macs(c_out, n_per_group, layer.kernel, (layer.h_out, layer.w_out))


def align_channels(target: float, align: int, c_in: int) -> int:
    """Nearest multiple of ``align`` to ``target`` (at least one block); ``c_in`` if that is not less."""
    n = max(align, int(round(target / align)) * align)
    return c_in if n >= c_in else n


def candidate_options(layer: Layer, n: int, prof: Profile) -> list[Option]:
    """Fast-path configurations of ``layer`` keeping about ``n`` input channels (see module doc)."""
    if n >= layer.c_in:
        return []
    options = [Option(1, n)]
    if layer.g1_only:
        return options
    g = 2
    while g <= MAX_GROUPS and layer.c_out // g >= prof.min_filters_per_group:
        per_group = layer.c_out // g
        if layer.c_out % g == 0 and per_group % prof.align == 0:
            if g * n == layer.c_in:
                options.append(Option(g, n, disjoint=True))
            else:
                options.append(Option(g, n))
                n_disjoint = layer.c_in // g
                if (layer.c_in % g == 0 and n_disjoint % prof.align == 0 and abs(n_disjoint - n) <= prof.align // 2
                        and n_disjoint < layer.c_in):
                    options.append(Option(g, n_disjoint, disjoint=True))
        g *= 2
    return options


class _Planner:
    def __init__(self, layers: dict[str, Layer], cost, prof: Profile, other_macs: int):
        self.layers = layers
        self.cost = cost
        self.prof = prof
        self.other_macs = other_macs
        self.order = [name for name, layer in layers.items() if layer.prunable]

    # -- cost of one Conv under a state of choices ----------------------------------------
    def needs_gather(self, name: str, state: dict[str, Option]) -> bool:
        option = state.get(name)
        if option is None:
            return False
        layer = self.layers[name]
        producer_groups = None
        if layer.producer is not None:
            producer = state.get(layer.producer)
            producer_groups = 1 if producer is None else producer.groups
        return not gather_folds(producer_groups, option.groups == 1 or option.disjoint)

    def out_channels(self, name: str, state: dict[str, Option]) -> int:
        consumer = self.layers[name].consumer
        return (self.folded_width(consumer, state) if consumer else None) or self.layers[name].c_out

    def folded_width(self, consumer: str, state: dict[str, Option]) -> int | None:
        """Channels a G=1 consumer keeps when its selection folds into the producer chain, else None."""
        option = state.get(consumer)
        if option is not None and option.groups == 1 and not self.needs_gather(consumer, state):
            return option.n_keep
        return None

    def conv_cost(self, name: str, state: dict[str, Option]) -> tuple[float, int]:
        layer = self.layers[name]
        if layer.narrowed_by is not None:  # a depthwise Conv on a folded chain runs the kept channels only
            n = self.folded_width(layer.narrowed_by, state) or layer.c_out
            op = ConvOp(n, n, n, layer.kernel, layer.stride, layer.h_out, layer.w_out)
            return self.cost.conv_us(op), n * layer.kernel[0] * layer.kernel[1] * layer.h_out * layer.w_out
        option = state.get(name)
        groups, n = (option.groups, option.n_keep) if option else (layer.groups, layer.c_in // layer.groups)
        c_out = self.out_channels(name, state)
        op = ConvOp(groups * n, c_out, groups, layer.kernel, layer.stride, layer.h_out, layer.w_out)
        time = self.cost.conv_us(op)
        if self.needs_gather(name, state):
            time += self.cost.gather_us(GatherOp(layer.c_in, groups * n, layer.h_in, layer.w_in))
        return time, _conv_macs(layer, c_out, n, groups)

    def affected(self, name: str) -> list[str]:
        layer = self.layers[name]
        consumer = self.layers[layer.consumer] if layer.consumer else None
        chains = layer.chain + (consumer.chain if consumer else ())
        return [n for n in (name, layer.producer, layer.consumer) if n] + list(chains)

    def local_time(self, name: str, state: dict[str, Option]) -> float:
        return sum(self.conv_cost(n, state)[0] for n in self.affected(name))

    # -- search ---------------------------------------------------------------------------
    def evaluate(self, rate: float, state: dict[str, Option]) -> Outcome:
        time = macs = 0
        for name in self.layers:
            t, m = self.conv_cost(name, state)
            time += t
            macs += m
        return Outcome(rate, dict(state), time, macs + self.other_macs)

    def best_option(self, name: str, rate: float, state: dict[str, Option]) -> Option | None:
        layer = self.layers[name]
        return self.best_option_at(name, align_channels((1.0 - rate) * layer.c_in, self.prof.align, layer.c_in), state)

    def best_option_at(self, name: str, n: int, state: dict[str, Option]) -> Option | None:
        """The fastest configuration keeping ``n`` input channels, or None if none saves ``MIN_SAVING``."""
        layer = self.layers[name]
        trial = dict(state)
        trial.pop(name, None)
        dense_time = self.local_time(name, trial)
        timed = []
        for option in candidate_options(layer, n, self.prof):
            trial[name] = option
            timed.append((self.local_time(name, trial), option))
        if not timed:
            return None
        best_time = min(t for t, _ in timed)
        if best_time > dense_time * (1.0 - MIN_SAVING):
            return None
        disjoint = [(t, o) for t, o in timed if o.disjoint and t <= best_time * (1.0 + DISJOINT_PREFERENCE)]
        pool = disjoint or [(t, o) for t, o in timed if t == best_time]
        return min(pool, key=lambda item: (item[0], item[1].groups, item[1].n_keep))[1]

    def plan_at(self, rate: float) -> Outcome:
        state: dict[str, Option] = {}
        for _ in range(2):
            for name in self.order:
                option = self.best_option(name, rate, state)
                if option is None:
                    state.pop(name, None)
                else:
                    state[name] = option
        return self.evaluate(rate, state)

    def relax(self, outcome: Outcome, macs_limit: float, dense_time: float, speedup: float | None) -> Outcome:
        """Give channels back, one block per step, while the MACs (and speedup) targets hold."""
        state = dict(outcome.state)
        macs, time = outcome.macs, outcome.time_us
        while True:
            best = None
            for name in self.order:
                option = state.get(name)
                if option is None or option.disjoint:
                    continue
                n = option.n_keep + self.prof.align
                bigger = None if n >= self.layers[name].c_in else Option(option.groups, n)
                trial = dict(state)
                trial[name] = bigger
                if bigger is None:
                    trial.pop(name)
                d_time = self.local_time(name, trial) - self.local_time(name, state)
                d_macs = self.local_macs(name, trial) - self.local_macs(name, state)
                if d_macs <= 0 or macs + d_macs > macs_limit:
                    continue
                if speedup is not None and dense_time / (time + d_time) < speedup:
                    continue
                if time + d_time >= dense_time:
                    continue
                key = (d_time / d_macs, name)
                if best is None or key < best[0]:
                    best = (key, trial, d_time, d_macs)
            if best is None:
                return self.evaluate(outcome.rate, state)
            _, state, d_time, d_macs = best
            time, macs = time + d_time, macs + d_macs

    def local_macs(self, name: str, state: dict[str, Option]) -> int:
        return sum(self.conv_cost(n, state)[1] for n in self.affected(name))
