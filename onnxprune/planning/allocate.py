"""Fidelity-aware planning: spend the MACs (or time) budget where the network's output changes least.

Why: the rate scan of ``speed_plan`` cuts every layer by the same fraction and keeps whatever
is fastest; on real ImageNet nets a 10% MACs cut chosen that way already loses the model,
because a few layers (those reading a residual stream, the last expansions) are far more
sensitive than the rest (``sensitivity.py`` measures by how much).

How:
1. Candidates. For every prunable Conv and every provider-aligned width n < C_in (at most
   ``MAX_WIDTHS`` spread over the range), the fastest configuration keeping n input channels
   (``speed_plan._Planner.best_option_at``: G=1 folded into its producer, grouped, disjoint;
   only ones predicted to save at least 2% of the layer's and its neighbours' time). Each has a
   resource saving (MACs, or predicted µs for a speed target) measured with only that layer
   changed, and a fidelity cost (``LayerSensitivity.cost_at(n)``: predicted KL of the output).
2. Choice: a multiple-choice knapsack solved exactly by dynamic programming over the saving,
   quantised to ``BINS`` steps of the required saving: minimise Σ cost subject to Σ saving ≥
   required, at most one candidate per layer. Costs are additive to first order (small,
   independent perturbations of the output add their KL); savings are additive except where a
   layer and its foldable producer are both narrowed, so the exact MACs of the chosen state are
   recomputed and the requirement raised by the shortfall until the target holds (a few rounds).
   Why DP and not a greedy by ratio: the curves are not convex (block alignment, the Gather a
   grouped option needs), where a ratio greedy can stop far from the optimum; the DP is exact
   on the quantised problem and takes milliseconds for 50 layers × 12 widths.
3. Any target can be re-planned from the same table in milliseconds (``fidelity_plan``); the
   pipeline's fidelity budget (``--min-agreement``) searches targets with real calibration.
4. Coupled channel groups (``--coupled-rate auto``, ``channels.coupled_candidates``): a group's
   cut narrows its readers' inputs, which exclude the readers' own single-Conv cuts. A group and
   its readers form one *cluster*: the readers' single-Conv choices are solved as their own small
   knapsack, and the cluster offers either one of those combinations or one width of the group;
   the global DP takes the cheaper through a min-plus convolution (exact on the quantised problem).
   The chosen state is evaluated on the layers narrowed by the chosen groups
   (``coupled_candidates.narrowed_layers``), so the MACs check stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .sensitivity import SensitivityReport
from .speed_plan import MACS_TOLERANCE, Option, Outcome, SpeedPlan, _Planner, ratios

MAX_WIDTHS = 12  # candidate widths per layer
# Speed weight (``speed_weight``): at a MACs target the knapsack minimises fidelity cost; a cut that
# saves MACs but little time (a Gather it needs, a layer the runtime runs memory-bound) is worth
# less than its MACs say. Measured costs differ between layers by orders of magnitude and accuracy
# comes first, so they are not weighted (on MobileNetV2 at 0.85 MACs, weight 0.5 would raise the
# predicted KL 12% for a 10% faster prediction); the data-free proxy is no fidelity measurement, so
# there time saved per MAC counts fully (MobileNetV2 at 0.58 MACs: 1.41x -> 1.46x (b1), 1.69x ->
# 1.91x (b8) measured side by side, ORT CPU; ResNets unchanged: the cost model sees their cuts as
# equally efficient).
MEASURED_SPEED_WEIGHT = 0.0
PROXY_SPEED_WEIGHT = 1.0
BINS = 400  # quantisation of the required saving in the knapsack
ROUNDS = 8  # tightening rounds when layer interactions make the exact MACs miss the target

NOT_REACHABLE = "target not reachable with the candidate cuts; deepest plan used"

@dataclass(frozen=True)
class Candidate:
    n_keep: int
    option: Option
    saving_macs: int
    saving_us: float
    cost: float


@dataclass
class Allocation:
    state: dict[str, Option]
    outcome: Outcome
    cost: float  # Σ predicted fidelity cost of the chosen cuts
    notes: list[str] = field(default_factory=list)
    considered: frozenset = frozenset()  # layers that had at least one candidate cut
    groups: list = field(default_factory=list)  # chosen (GroupCandidates, GroupCut) pairs


def candidate_widths(c_in: int, align: int) -> list[int]:
    """Aligned widths below ``c_in``, at most ``MAX_WIDTHS`` of them spread evenly, ascending."""
    widths = list(range(align, c_in, align))
    if len(widths) > MAX_WIDTHS:
        picks = np.linspace(0, len(widths) - 1, MAX_WIDTHS)
        widths = sorted({widths[int(round(i))] for i in picks})
    return widths


def speed_weight(sensitivity: SensitivityReport) -> float:
    """How much a candidate's time saved per MAC weighs against its fidelity cost (the exponent
    ``γ`` in ``cost / (ρ / ρ_dense)^γ``, ρ = µs saved per MAC saved): ``MEASURED_SPEED_WEIGHT``
    when the costs are measured output changes, ``PROXY_SPEED_WEIGHT`` for the data-free proxy."""
    measured = any(layer.source != "weights" for layer in sensitivity.layers.values())
    return MEASURED_SPEED_WEIGHT if measured else PROXY_SPEED_WEIGHT


def speed_weighted(cost: float, saving_us: float, saving_macs: float, dense_us_per_mac: float, weight: float) -> float:
    """``cost / (ρ / ρ_dense)^weight`` (``speed_weight``): a cut that saves more time per MAC than
    the model's average counts as cheaper; one that saves no time is floored, not infinite."""
    if not weight:
        return cost
    return cost / max((saving_us / saving_macs) / dense_us_per_mac, 1e-6) ** weight


def candidates(planner: _Planner, sensitivity: SensitivityReport) -> dict[str, list[Candidate]]:
    """Every layer's candidate cuts, each with its isolated saving and its fidelity cost
    (weighted by its time saved per MAC, ``speed_weight``)."""
    table: dict[str, list[Candidate]] = {}
    weight = speed_weight(sensitivity)
    dense = planner.evaluate(0.0, {})
    dense_us_per_mac = dense.time_us / max(dense.macs, 1)
    for name in planner.order:
        sens = sensitivity.layers.get(name)
        if sens is None:
            continue
        dense_time, dense_macs = planner.local_time(name, {}), planner.local_macs(name, {})
        found = []
        for n in sens.widths:
            option = planner.best_option_at(name, n, {})
            if option is None:
                continue
            state = {name: option}
            d_macs = dense_macs - planner.local_macs(name, state)
            d_time = dense_time - planner.local_time(name, state)
            if d_macs > 0 and d_time > 0:
                cost = speed_weighted(sens.cost_at(option.n_keep), d_time, d_macs, dense_us_per_mac, weight)
                found.append(Candidate(n, option, int(d_macs), float(d_time), cost))
        if found:
            table[name] = found
    return table


def allocate(planner: _Planner, table: dict[str, list[Candidate]], dense: Outcome, *,
             macs_limit: float | None = None, time_limit: float | None = None, groups=(),
             planner_for=None) -> Allocation:
    """Cheapest set of cuts whose exact MACs (or predicted time) is at most the limit.

    ``groups``: coupled-group candidates (``coupled_candidates.GroupCandidates``);
    ``planner_for(chosen)``: the planner of the model with the chosen group cuts applied (its
    outcomes are the exact ones of a state with those cuts)."""
    by_time = macs_limit is None
    limit = time_limit if by_time else macs_limit
    if limit is None:
        raise ValueError("allocate needs a MACs or a time limit")
    total = dense.time_us if by_time else dense.macs
    need = total - limit
    considered = frozenset(table)
    if need <= 0:
        return Allocation({}, dense, 0.0, considered=considered)
    clusters = _clusters(table, groups)
    notes: list[str] = []
    reachable = _reachable(table, clusters, by_time)
    capped = need > reachable
    if capped:
        # quantised to need/BINS, cuts much smaller than an unreachable need would all round to 0
        # and the "deepest plan" would be no plan: aim at the most the candidates can save instead
        notes.append(NOT_REACHABLE)
        need = reachable
        if need <= 0:
            return Allocation({}, dense, 0.0, notes, considered)
    state: dict[str, Option] = {}
    chosen: list = []
    outcome, narrowed = dense, planner
    for _ in range(ROUNDS):
        state, chosen, feasible = _knapsack(table, clusters, need, by_time)
        narrowed = planner_for(chosen) if chosen else planner  # the model as the chosen groups leave it
        outcome = narrowed.evaluate(0.0, state)
        value = _value(outcome, by_time)
        if not feasible:
            if not notes:
                notes.append(NOT_REACHABLE)
            break
        if value <= limit or capped:  # capped: already the deepest the candidates allow
            break
        need += value - limit + need / BINS
    else:
        state, outcome = _deepen(narrowed, table, state, outcome, limit, by_time)
        if not feasible_state(outcome, limit, by_time):
            notes.append("target missed by layer interactions after tightening; closest plan used")
    if feasible_state(outcome, limit, by_time) and not capped:
        state, outcome = _relax(narrowed, table, state, outcome, limit, by_time)
        overshoot = _overshoot_note(outcome, dense, limit, total, by_time)
        if overshoot:
            notes.append(overshoot)
    cost_of = _costs(table)
    cost = sum(cost_of[name][option] for name, option in state.items()) + sum(cut.cost for _, cut in chosen)
    return Allocation(state, outcome, cost, notes, considered, chosen)


OVERSHOOT = 0.05  # a plan this far (fraction of dense) below the target is named in the notes


def _overshoot_note(outcome: Outcome, dense: Outcome, limit: float, total: float, by_time: bool) -> str:
    """A note when the cheapest plan that meets the target cuts much deeper than asked: the cuts
    come in aligned steps, and a model whose MACs sit in one or two large layers has few of them
    (a DNSMOS audio CNN asked for MACs x0.70 got x0.585: its one prunable layer goes 64 -> 48 ->
    32 channels); the user should hear that the target was overshot, not find it in the count."""
    asked, got = limit / total, _value(outcome, by_time) / total
    if asked - got < OVERSHOOT:
        return ""
    if by_time:
        return (f"the nearest plan that meets the target cuts deeper than asked (predicted time x{got:.3f}, "
                f"{total / max(_value(outcome, by_time), 1e-9):.2f}x, for a target of {total / limit:.2f}x): "
                f"the candidate cuts come in steps of the provider's channel alignment")
    return (f"the nearest plan that meets the target cuts deeper than asked (MACs x{got:.3f} for a target of "
            f"x{asked - MACS_TOLERANCE:.3f}): the candidate cuts come in steps of the provider's channel alignment")


def feasible_state(outcome: Outcome, limit: float, by_time: bool) -> bool:
    return _value(outcome, by_time) <= limit


def _value(outcome: Outcome, by_time: bool) -> float:
    """What the limit bounds: predicted µs for a speed target, MACs otherwise."""
    return outcome.time_us if by_time else outcome.macs


def _local(planner: _Planner, name: str, state: dict[str, Option], by_time: bool) -> float:
    """``_value`` of the Convs a change to ``name`` touches (exact: no other Conv changes)."""
    return planner.local_time(name, state) if by_time else planner.local_macs(name, state)


def _costs(table) -> dict[str, dict]:
    """Layer -> option -> fidelity cost of that candidate."""
    return {name: {c.option: c.cost for c in cands} for name, cands in table.items()}


def _relax(planner: _Planner, table, state: dict[str, Option], outcome: Outcome, limit: float,
           by_time: bool) -> tuple[dict[str, Option], Outcome]:
    """Spend the slack the tightening rounds leave (layer interactions make the exact saving of a
    state larger than the quantised DP assumed, so it can land well below the limit): repeatedly
    make the one change to a chosen layer — a narrower cut or none — that lowers the fidelity cost
    most while the exact MACs (time) stay within the limit. Changes are judged by the layer's
    neighbourhood (``_Planner.local_*``: exact, only those Convs change); ``planner`` is the one of
    the model with the chosen group cuts applied, and the result is checked once more in full."""
    value, cost_of = _value(outcome, by_time), _costs(table)
    for _ in range(4 * len(state) + 1):
        best = None
        for name, option in state.items():
            here = _local(planner, name, state, by_time)
            for alternative in [None, *(c.option for c in table[name])]:
                if alternative == option:
                    continue
                gain = cost_of[name][option] - (cost_of[name][alternative] if alternative else 0.0)
                if gain <= 1e-12 or (best is not None and gain <= best[0]):
                    continue
                trial = dict(state)
                if alternative is None:
                    del trial[name]
                else:
                    trial[name] = alternative
                after = value - here + _local(planner, name, trial, by_time)
                if after <= limit:
                    best = (gain, trial, after)
        if best is None:
            break
        _, state, value = best
    relaxed = planner.evaluate(0.0, state)
    if not feasible_state(relaxed, limit, by_time):  # never: local changes are exact
        return dict(outcome.state), outcome
    return state, relaxed


def _deepen(planner: _Planner, table, state: dict[str, Option], outcome: Outcome, limit: float,
            by_time: bool) -> tuple[dict[str, Option], Outcome]:
    """When the tightening rounds end just above the limit (the DP's quantised savings keep
    choosing a state whose interactions cost a little more), take single changes — a layer's
    deeper candidate, or a cut of a layer not yet cut: the cheapest one that alone meets the
    limit, else the one with the least cost added per unit saved — until the exact value is
    within the limit (or nothing helps: the closest state is kept)."""
    value, cost_of = _value(outcome, by_time), _costs(table)
    readers = set(table) - set(planner.order)  # a chosen group's readers: no cut of their own

    for _ in range(2 * len(table) + 1):
        if value <= limit:
            break
        best = enough = None  # the best rate overall; the cheapest change that alone meets the limit
        for name, cands in table.items():
            if name in readers:
                continue
            here, now = _local(planner, name, state, by_time), cost_of[name].get(state.get(name), 0.0)
            for cand in cands:
                if cand.option == state.get(name):
                    continue
                trial = {**state, name: cand.option}
                saved = here - _local(planner, name, trial, by_time)
                if saved <= 0:
                    continue
                added = cand.cost - now
                if value - saved <= limit and (enough is None or added < enough[0]):
                    enough = (added, trial, value - saved)
                if best is None or added / saved < best[0]:
                    best = (added / saved, trial, value - saved)
        if best is None:
            break
        _, state, value = enough or best
    return state, planner.evaluate(0.0, state)


def _saving(cand, by_time: bool) -> float:
    return cand.saving_us if by_time else cand.saving_macs


def _clusters(table: dict[str, list[Candidate]], groups) -> list[tuple[object, list[str]]]:
    """(group, its readers that have single-Conv candidates) for every group with a cut."""
    return [(group, [name for name in group.consumers if name in table]) for group in groups if group.cuts]


def _reachable(table, clusters, by_time: bool) -> float:
    in_cluster = {name for _, readers in clusters for name in readers}
    total = sum(max(_saving(c, by_time) for c in cands) for name, cands in table.items() if name not in in_cluster)
    for group, readers in clusters:
        alone = sum(max(_saving(c, by_time) for c in table[name]) for name in readers)
        total += max(alone, max(_saving(cut, by_time) for cut in group.cuts))
    return total


def _layer_step(dp: np.ndarray, cands, unit: float, by_time: bool, start=None):
    """One multiple-choice item: (new dp, candidate index per bin (-1: none), source bin per bin);
    ``start``: those three arrays for the item's other choices (default: none taken)."""
    bins = np.arange(len(dp))
    new, pick, source = start if start is not None else (dp.copy(), np.full(len(dp), -1), bins.copy())
    for k, cand in enumerate(cands):
        step = int(_saving(cand, by_time) // unit)
        if step <= 0:
            continue
        src = np.maximum(bins - step, 0)
        value = dp[src] + cand.cost
        better = value < new
        new, pick, source = np.where(better, value, new), np.where(better, k, pick), np.where(better, src, source)
    return new, pick, source


def _knapsack(table: dict[str, list[Candidate]], clusters, need: float,
              by_time: bool) -> tuple[dict[str, Option], list, bool]:
    """Exact multiple-choice knapsack on savings quantised to need/BINS (rounded down: safe).

    ``dp[s]``: least cost of a choice for the items so far saving at least ``s`` units."""
    unit = need / BINS
    bins = np.arange(BINS + 1)
    dp = np.full(BINS + 1, np.inf)
    dp[0] = 0.0
    in_cluster = {name for _, readers in clusters for name in readers}
    steps = []  # ("layer", name, pick, source) or ("cluster", group, readers' steps, mode, k, source)
    for name, cands in table.items():
        if name in in_cluster:
            continue
        dp, pick, source = _layer_step(dp, cands, unit, by_time)
        steps.append(("layer", name, pick, source))
    for group, readers in clusters:
        sub = np.full(BINS + 1, np.inf)
        sub[0] = 0.0
        sub_steps = []
        for name in readers:
            sub, pick, source = _layer_step(sub, table[name], unit, by_time)
            sub_steps.append((name, pick, source))
        # the readers' combinations: new[s] = min_k dp[s - k] + sub[k]  (k <= s; "at least" bins)
        shifted = np.where(bins[:, None] >= bins[None, :], dp[np.maximum(bins[:, None] - bins[None, :], 0)], np.inf)
        combined = shifted + sub[None, :]
        k_best = np.argmin(combined, axis=1)
        new = combined[bins, k_best]
        # ... or one width of the group (readers dense)
        dp, mode, source = _layer_step(dp, group.cuts, unit, by_time,
                                       (new, np.full(BINS + 1, -1), np.maximum(bins - k_best, 0)))
        k_best = np.where(mode >= 0, 0, k_best)
        steps.append(("cluster", group, sub_steps, mode, k_best, source))
    feasible = bool(np.isfinite(dp[BINS]))
    at = BINS if feasible else int(np.flatnonzero(np.isfinite(dp)).max())
    state: dict[str, Option] = {}
    chosen = []
    for step in reversed(steps):
        if step[0] == "layer":
            _, name, pick, source = step
            k = int(pick[at])
            if k >= 0:
                state[name] = table[name][k].option
                at = int(source[at])
            continue
        _, group, sub_steps, mode, k_best, source = step
        w, k = int(mode[at]), int(k_best[at])
        if w >= 0:
            chosen.append((group, group.cuts[w]))
        else:
            sub_at = k
            for name, pick, sub_source in reversed(sub_steps):
                j = int(pick[sub_at])
                if j >= 0:
                    state[name] = table[name][j].option
                    sub_at = int(sub_source[sub_at])
        at = int(source[at])
    chosen.reverse()
    return state, chosen, feasible


def speed_plan_of(allocation: Allocation, planner: _Planner, dense: Outcome, skipped: dict[str, str],
                  cost_source: str, provider: str) -> SpeedPlan:
    """The allocation in the speed planner's output form (per-layer configs for ``plan_model``)."""
    configs = {name: {"skip": reason} for name, reason in skipped.items()}
    readers = {name for group, _ in allocation.groups for name in group.consumers}
    for name, layer in planner.layers.items():
        if not layer.prunable:
            continue
        option = allocation.state.get(name)
        if option:
            configs[name] = option.as_config()
        elif name in readers:
            continue  # its input is a coupled group's choice (coupled.lift gives it its layer)
        elif name in allocation.considered:
            configs[name] = {"skip": f"auto: kept dense (its cuts cost more fidelity per MAC saved on {provider})"}
        else:
            configs[name] = {"skip": f"auto: kept dense (no narrower width is predicted to save time on {provider})"}
    outcome = allocation.outcome
    speedup, macs_ratio = ratios(dense, outcome)
    return SpeedPlan(configs, None, speedup, macs_ratio, dense.time_us, outcome.time_us, cost_source,
                     list(allocation.notes), list(allocation.groups))
