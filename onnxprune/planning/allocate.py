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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .sensitivity import SensitivityReport
from .speed_plan import Option, Outcome, SpeedPlan, _Planner, ratios

MAX_WIDTHS = 12  # candidate widths per layer
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


def candidate_widths(c_in: int, align: int) -> list[int]:
    """Aligned widths below ``c_in``, at most ``MAX_WIDTHS`` of them spread evenly, ascending."""
    widths = list(range(align, c_in, align))
    if len(widths) > MAX_WIDTHS:
        picks = np.linspace(0, len(widths) - 1, MAX_WIDTHS)
        widths = sorted({widths[int(round(i))] for i in picks})
    return widths


def candidates(planner: _Planner, sensitivity: SensitivityReport) -> dict[str, list[Candidate]]:
    """Every layer's candidate cuts, each with its isolated saving and its fidelity cost."""
    table: dict[str, list[Candidate]] = {}
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
                found.append(Candidate(n, option, int(d_macs), float(d_time), sens.cost_at(option.n_keep)))
        if found:
            table[name] = found
    return table


def allocate(planner: _Planner, table: dict[str, list[Candidate]], dense: Outcome, *,
             macs_limit: float | None = None, time_limit: float | None = None) -> Allocation:
    """Cheapest set of cuts whose exact MACs (or predicted time) is at most the limit."""
    by_time = macs_limit is None
    limit = time_limit if by_time else macs_limit
    if limit is None:
        raise ValueError("allocate needs a MACs or a time limit")
    total = dense.time_us if by_time else dense.macs
    need = total - limit
    if need <= 0:
        return Allocation({}, dense, 0.0, considered=frozenset(table))
    notes: list[str] = []
    reachable = sum(max((c.saving_us if by_time else c.saving_macs) for c in cands) for cands in table.values())
    capped = need > reachable
    if capped:
        # quantised to need/BINS, cuts much smaller than an unreachable need would all round to 0
        # and the "deepest plan" would be no plan: aim at the most the candidates can save instead
        notes.append(NOT_REACHABLE)
        need = reachable
        if need <= 0:
            return Allocation({}, dense, 0.0, notes, frozenset(table))
    state: dict[str, Option] = {}
    outcome = dense
    for _ in range(ROUNDS):
        state, feasible = _knapsack(table, need, by_time)
        outcome = planner.evaluate(0.0, state)
        value = outcome.time_us if by_time else outcome.macs
        if not feasible:
            if not notes:
                notes.append(NOT_REACHABLE)
            break
        if value <= limit or capped:  # capped: already the deepest the candidates allow
            break
        need += value - limit + need / BINS
    else:
        notes.append("target missed by layer interactions after tightening; closest plan used")
    cost = sum(next(c.cost for c in table[name] if c.option == option) for name, option in state.items())
    return Allocation(state, outcome, cost, notes, frozenset(table))


def _knapsack(table: dict[str, list[Candidate]], need: float, by_time: bool) -> tuple[dict[str, Option], bool]:
    """Exact multiple-choice knapsack on savings quantised to need/BINS (rounded down: safe).

    ``dp[s]``: least cost of a choice for the layers so far saving at least ``s`` units.
    """
    unit = need / BINS
    bins = np.arange(BINS + 1)
    dp = np.full(BINS + 1, np.inf)
    dp[0] = 0.0
    choices = []  # per layer: the candidate index (-1: dense) and the source bin, for every bin
    for name, cands in table.items():
        new, pick, source = dp.copy(), np.full(BINS + 1, -1), bins.copy()
        for k, cand in enumerate(cands):
            step = int((cand.saving_us if by_time else cand.saving_macs) // unit)
            if step <= 0:
                continue
            src = np.maximum(bins - step, 0)
            value = dp[src] + cand.cost
            better = value < new
            new, pick, source = np.where(better, value, new), np.where(better, k, pick), np.where(better, src, source)
        dp = new
        choices.append((name, pick, source))
    feasible = bool(np.isfinite(dp[BINS]))
    at = BINS if feasible else int(np.flatnonzero(np.isfinite(dp)).max())
    state: dict[str, Option] = {}
    for name, pick, source in reversed(choices):
        k = int(pick[at])
        if k >= 0:
            state[name] = table[name][k].option
            at = int(source[at])
    return state, feasible


def speed_plan_of(allocation: Allocation, planner: _Planner, dense: Outcome, skipped: dict[str, str],
                  cost_source: str, provider: str) -> SpeedPlan:
    """The allocation in the speed planner's output form (per-layer configs for ``plan_model``)."""
    configs = {name: {"skip": reason} for name, reason in skipped.items()}
    for name, layer in planner.layers.items():
        if not layer.prunable:
            continue
        option = allocation.state.get(name)
        if option:
            configs[name] = option.as_config()
        elif name in allocation.considered:
            configs[name] = {"skip": f"auto: kept dense (its cuts cost more fidelity per MAC saved on {provider})"}
        else:
            configs[name] = {"skip": f"auto: kept dense (no narrower width is predicted to save time on {provider})"}
    outcome = allocation.outcome
    speedup, macs_ratio = ratios(dense, outcome)
    return SpeedPlan(configs, None, speedup, macs_ratio, dense.time_us, outcome.time_us, cost_source,
                     list(allocation.notes))
