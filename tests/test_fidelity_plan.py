"""Fidelity-aware planning: the knapsack is exact, measured costs behave, targets and the rate-0
identity hold, and the fidelity budget picks the deepest plan that meets it (or says it cannot)."""

import itertools
from dataclasses import dataclass, field

import numpy as np
import pytest

from onnxprune.planning import allocate, budget
from onnxprune.planning.allocate import Candidate
from onnxprune.errors import UserError
from onnxprune.planning.fidelity_plan import FidelityPlanner
from onnxprune.ir.normalize import normalize
from onnxprune.pipeline import PruneConfig, prune, resolve_min_agreement
from onnxprune.planning.sensitivity import measure
from onnxprune.planning.speed_plan import Option
from test_speed_plan import wide_resnet as _wide_resnet

SIZE = 16  # small images and 32/64 channels keep the calibration passes of these tests fast


def wide_resnet():
    return _wide_resnet(size=SIZE, width=32)


def calib(n=40, size=SIZE, seed=3, channels=3):
    rng = np.random.default_rng(seed)
    return {"input": np.abs(rng.standard_normal((n, 3, size, size))).astype(np.float32)}


# -- the knapsack ---------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(12))
def test_knapsack_matches_brute_force_on_the_quantised_problem(seed):
    rng = np.random.default_rng(seed)
    table = {f"L{i}": [Candidate(n, Option(1, n), int(rng.integers(1, 400)), 0.0, float(rng.random()))
                       for n in range(int(rng.integers(1, 4)))] for i in range(5)}
    need = float(rng.integers(100, 900))
    state, chosen, feasible = allocate._knapsack(table, [], need, by_time=False)
    assert chosen == []
    unit = need / allocate.BINS
    best = None
    for combo in itertools.product(*[[None] + cands for cands in table.values()]):
        saving = sum(int(c.saving_macs // unit) for c in combo if c)
        if saving >= allocate.BINS:
            cost = sum(c.cost for c in combo if c)
            best = cost if best is None else min(best, cost)
    assert feasible == (best is not None)
    if best is not None:
        got = sum(next(c.cost for c in table[name] if c.option == option) for name, option in state.items())
        assert got == pytest.approx(best, abs=1e-12)
        assert sum(int(next(c for c in table[n] if c.option == o).saving_macs // unit)
                   for n, o in state.items()) >= allocate.BINS


@pytest.mark.parametrize("seed", range(12))
def test_knapsack_with_coupled_groups_matches_brute_force(seed):
    """A group's cut excludes its readers' own cuts: the cluster DP must find the best of
    'readers cut alone (any combination)' and 'one width of the group, readers dense'."""
    from onnxprune.channels.coupled_candidates import GroupCandidates, GroupCut

    rng = np.random.default_rng(seed)

    def cands(n):
        return [Candidate(k + 1, Option(1, k + 1), int(rng.integers(1, 400)), 0.0, float(rng.random()))
                for k in range(n)]

    table = {f"L{i}": cands(int(rng.integers(1, 3))) for i in range(6)}
    groups = []
    for g, readers in enumerate((("L0", "L1"), ("L3", "L9"))):  # L9: a Gemm reader, no table entry
        cuts = tuple(GroupCut((0,) * (w + 1), int(rng.integers(50, 700)), 0.0, float(rng.random()))
                     for w in range(int(rng.integers(1, 3))))
        groups.append(GroupCandidates(((f"t{g}", 0),), 64, ("P",), readers, cuts))
    need = float(rng.integers(300, 1500))
    clusters = allocate._clusters(table, groups)
    state, chosen, feasible = allocate._knapsack(table, clusters, need, by_time=False)
    unit = need / allocate.BINS
    options = {name: [None] + c for name, c in table.items()}
    best = None
    for combo in itertools.product(*options.values(), *[[None, *g.cuts] for g in groups]):
        layers, cuts = dict(zip(options, combo[:len(options)])), combo[len(options):]
        if any(cut and any(layers.get(r) for r in g.consumers) for g, cut in zip(groups, cuts)):
            continue  # a reader cut twice
        saving = sum(int(c.saving_macs // unit) for c in (*layers.values(), *cuts) if c)
        if saving >= allocate.BINS:
            cost = sum(c.cost for c in (*layers.values(), *cuts) if c)
            best = cost if best is None else min(best, cost)
    assert feasible == (best is not None)
    if best is not None:
        got = sum(next(c.cost for c in table[name] if c.option == option) for name, option in state.items())
        got += sum(cut.cost for _, cut in chosen)
        assert got == pytest.approx(best, abs=1e-12)
        for group, _ in chosen:
            assert not set(group.consumers) & set(state)
        saving = sum(int(next(c for c in table[n] if c.option == o).saving_macs // unit) for n, o in state.items())
        assert saving + sum(int(cut.saving_macs // unit) for _, cut in chosen) >= allocate.BINS


def test_candidate_widths_are_aligned_spread_and_below_c_in():
    assert allocate.candidate_widths(24, 16) == [16]
    assert allocate.candidate_widths(16, 16) == []
    widths = allocate.candidate_widths(960, 16)
    assert len(widths) == allocate.MAX_WIDTHS and widths[0] == 16 and widths[-1] == 944
    assert all(w % 16 == 0 and w < 960 for w in widths)


# -- measured sensitivities -------------------------------------------------------------------

@pytest.fixture(scope="module")
def measured():
    model = normalize(wide_resnet())
    planner = FidelityPlanner(model, PruneConfig(), calib())
    return model, planner


def test_measured_costs_are_monotone_and_zero_when_dense(measured):
    _, planner = measured
    assert planner.measured and planner.sensitivity.layers
    for sens in planner.sensitivity.layers.values():
        assert all(a >= b - 1e-12 for a, b in zip(sens.cost, sens.cost[1:]))  # narrower never cheaper
        assert sens.cost_at(sens.c_in) == 0.0
        assert all(0.0 <= r <= 1.0 + 1e-9 for r in sens.rel_err)
        assert len(sens.measured) >= 1


def test_duplicated_input_channels_cost_nothing_to_drop(measured):
    """A layer whose input holds every channel twice refits exactly at half width (oracle)."""
    model, _ = measured
    import onnx
    from onnxprune.ir.graph import GraphIndex, set_initializer

    dup = onnx.ModelProto()
    dup.CopyFrom(model)
    index = GraphIndex(dup.graph)
    convs = [n for n in dup.graph.node if n.op_type == "Conv"]
    first, second = convs[0], convs[1]  # stem (32 filters) -> first block conv
    w = index.constant(first.input[1]).copy()
    w[16:] = w[:16]  # filters 16..31 repeat 0..15, so channels c and c+16 of its output are equal
    set_initializer(dup.graph, first.input[1], w)
    bias = index.constant(first.input[2]).copy()
    bias[16:] = bias[:16]
    set_initializer(dup.graph, first.input[2], bias)
    sens = measure(dup, calib(), {second.name: [8, 16, 24]}).layers[second.name]
    plain = measure(model, calib(), {second.name: [8, 16, 24]}).layers[second.name]
    # only the ridge prior towards the original kernels keeps the duplicated case from exactly 0
    assert sens.rel_err[1] < 1e-3 and sens.rel_err[2] < 1e-3
    assert plain.rel_err[1] > 10 * sens.rel_err[1]
    assert sens.rel_err[0] > 10 * sens.rel_err[1]


# -- planning to targets ------------------------------------------------------------------------

@pytest.mark.parametrize("target", [0.9, 0.75])
def test_fidelity_plan_meets_the_macs_target_and_the_output_has_those_macs(target):
    config = PruneConfig(target_macs=target, calib=calib(), min_agreement=None)
    pruned, report = prune(wide_resnet(), config)
    assert report["verify"]["passed"]
    ratio = report["macs_after"] / report["macs_before"]
    assert ratio <= target + 0.005
    assert ratio == pytest.approx(report["auto"]["predicted_macs_ratio"], abs=1e-3)
    assert report["auto"]["planner"] == "fidelity" and report["sensitivity"]["source"] == "calibration data"


@pytest.mark.parametrize("target", [0.85, 0.7, 0.55])
def test_no_single_change_to_the_allocation_lowers_its_cost_within_the_target(target):
    """After the tightening rounds the slack is spent (allocate._relax): no chosen layer can take a
    cheaper candidate (or none) with the exact MACs still within the limit."""
    planner = FidelityPlanner(normalize(wide_resnet()), PruneConfig(groups="auto"))
    _, allocation = planner.plan(target)
    limit = (target + 0.005) * planner.dense.macs
    assert allocation.outcome.macs <= limit and allocation.state
    cost = {name: {c.option: c.cost for c in cands} for name, cands in planner.table.items()}
    for name, option in allocation.state.items():
        for alternative in [None, *cost[name]]:
            trial = {k: v for k, v in allocation.state.items() if k != name}
            if alternative is not None:
                trial[name] = alternative
            cheaper = (cost[name][alternative] if alternative else 0.0) < cost[name][option] - 1e-12
            assert not (cheaper and planner.planner.evaluate(0.0, trial).macs <= limit), (name, alternative)


class _InteractingPlanner:
    """Layers whose cuts save their listed MACs, except that cutting L0 and L1 together saves 280
    fewer (a producer and its consumer both narrowed): the DP over isolated savings must tighten,
    which overshoots and leaves slack."""

    def __init__(self, table):
        self.table = table
        self.order = list(table)

    def evaluate(self, rate, state):
        from onnxprune.planning.speed_plan import Outcome

        saved = sum(next(c.saving_macs for c in self.table[n] if c.option == o) for n, o in state.items())
        if "L0" in state and "L1" in state:
            saved -= 280
        return Outcome(rate, dict(state), 0.0, 2000 - saved)

    def local_macs(self, name, state):
        return self.evaluate(0.0, state).macs  # every layer "affects" all: exact, if slow

    def local_time(self, name, state):
        return 0.0


def test_relax_spends_the_slack_of_the_tightening_rounds(monkeypatch):
    table = {f"L{i}": [Candidate(1, Option(1, 1), 300, 1.0, 0.1)] for i in range(2)}  # cheap, so both taken
    table.update({f"L{i}": [Candidate(k, Option(1, k), saving, 1.0, cost) for k, (saving, cost) in
                            enumerate(((300, 1.0), (500, 1.5)))] for i in range(2, 5)})
    planner = _InteractingPlanner(table)
    dense = planner.evaluate(0.0, {})
    relaxed = allocate.allocate(planner, table, dense, macs_limit=1150)
    monkeypatch.setattr(allocate, "_relax", lambda planner, table, state, outcome, *rest: (state, outcome))
    tightened = allocate.allocate(planner, table, dense, macs_limit=1150)
    assert tightened.outcome.macs < relaxed.outcome.macs <= 1150  # the slack was there, and spent
    assert relaxed.cost < tightened.cost
    cost = {name: {c.option: c.cost for c in cands} for name, cands in table.items()}
    for name, option in relaxed.state.items():  # and no single change is still cheaper within the limit
        for alternative in [None, *cost[name]]:
            trial = {k: v for k, v in relaxed.state.items() if k != name}
            if alternative is not None:
                trial[name] = alternative
            cheaper = (cost[name][alternative] if alternative else 0.0) < cost[name][option] - 1e-12
            assert not (cheaper and planner.evaluate(0.0, trial).macs <= 1150), (name, alternative)


def test_deepen_meets_a_target_the_tightening_rounds_missed(monkeypatch):
    """One tightening round (ROUNDS=1) ends above the limit on the interacting layers; single
    deeper changes (least cost per MAC saved) then meet it, and no 'missed' note is left."""
    table = {f"L{i}": [Candidate(1, Option(1, 1), 300, 1.0, 0.1)] for i in range(2)}
    table.update({f"L{i}": [Candidate(k, Option(1, k), saving, 1.0, cost) for k, (saving, cost) in
                            enumerate(((300, 1.0), (500, 1.5)))] for i in range(2, 5)})
    planner = _InteractingPlanner(table)
    dense = planner.evaluate(0.0, {})
    monkeypatch.setattr(allocate, "ROUNDS", 1)
    met = allocate.allocate(planner, table, dense, macs_limit=1150)
    assert met.outcome.macs <= 1150 and not met.notes
    monkeypatch.setattr(allocate, "_deepen", lambda planner, table, state, outcome, *rest: (state, outcome))
    missed = allocate.allocate(planner, table, dense, macs_limit=1150)
    assert missed.outcome.macs > 1150 and any("target missed" in note for note in missed.notes)


def test_an_unreachable_target_gives_the_deepest_plan_and_says_so():
    _, report = prune(wide_resnet(), PruneConfig(target_macs=0.05, calib=calib(), min_agreement=None))
    assert any("not reachable" in note for note in report["auto"]["notes"])
    deepest = report["macs_after"] / report["macs_before"]
    _, shallower = prune(wide_resnet(), PruneConfig(target_macs=0.8, calib=calib(), min_agreement=None))
    assert deepest < shallower["macs_after"] / shallower["macs_before"]


def test_without_data_the_plan_says_fidelity_is_unmeasured():
    _, report = prune(wide_resnet(), PruneConfig(target_macs=0.7))
    assert report["sensitivity"]["source"].startswith("weights")
    assert any("fidelity unmeasured" in note for note in report["auto"]["notes"])
    assert report["macs_after"] / report["macs_before"] <= 0.705


@pytest.mark.parametrize("data", [None, "calib"])
def test_rate_zero_and_target_one_are_the_identity(data):
    for config in (PruneConfig(rate=0.0), PruneConfig(target_macs=1.0)):
        if data:
            config.calib, config.min_agreement = calib(), None
        _, report = prune(wide_resnet(), config)
        assert report["convs_pruned"] == 0
        assert report["macs_after"] == report["macs_before"]


# -- the fidelity budget ---------------------------------------------------------------------

@dataclass
class FakePlan:
    macs_ratio: float
    configs: dict = field(default_factory=dict)

    @property
    def predicted_speedup(self):
        return 1.0 / max(self.macs_ratio, 0.1)


class FakePlanner:
    def plan(self, target):  # a dense plan's layers say why, as allocate.speed_plan_of words it
        dense = {"a": {"skip": "auto: kept dense (no narrower width is predicted to save time on cpu)"},
                 "stem": {"skip": "too few channels (C_in=3 < min-channels 16)"}}
        return FakePlan(target, dense if target >= 1.0 else {"a": {"groups": 1}}), None


def fake_calibrate(agreement_of_target):
    def run(speed_plan):
        a = agreement_of_target(speed_plan.macs_ratio)
        return ("plan", "model", {"fidelity": {"samples": 100_000,  # a tight bound: tests the bisection
                                               "calibrated": {"top1_agreement": a, "mean_kl": 1 - a}}})
    return run


def test_budget_search_returns_the_deepest_grid_plan_that_meets_it():
    run = fake_calibrate(lambda t: min(1.0, 0.5 + t))  # agreement grows as fewer MACs are cut
    first = FakePlan(0.3)
    result = budget.search_budget(FakePlanner(), 0.3, 0.95, first, run(first), run)
    assert result.met
    grid = budget.target_grid(0.3)
    meeting = [t for t in grid if 0.5 + t >= 0.955]  # the lower bound sits just below the estimate
    assert result.chosen_target == pytest.approx(min(meeting))
    assert all(t["meets_budget"] == (t["agreement_lower_bound"] >= 0.95) for t in result.trials)
    assert len(result.trials) <= 1 + int(np.ceil(np.log2(len(grid)))) + 1


def test_budget_met_at_the_requested_depth_costs_one_trial():
    run = fake_calibrate(lambda t: 0.99)
    first = FakePlan(0.5)
    result = budget.search_budget(FakePlanner(), 0.5, 0.95, first, run(first), run)
    assert result.met and result.chosen_target == 0.5 and len(result.trials) == 1


def test_unmeetable_budget_ends_dense_and_says_so():
    run = fake_calibrate(lambda t: 1.0 if t >= 1.0 else 0.5)
    first = FakePlan(0.6)
    result = budget.search_budget(FakePlanner(), 0.6, 0.99, first, run(first), run)
    assert result.chosen_target == 1.0 and "left dense" in result.note
    # the layers say the budget kept them dense, not the cost model; other reasons stay
    assert result.chosen_plan.configs["a"]["skip"].startswith("auto: kept dense by the fidelity budget")
    assert ">= 99.0%, 90% lower bound" in result.chosen_plan.configs["a"]["skip"]
    assert result.chosen_plan.configs["stem"]["skip"].startswith("too few channels")


def test_min_agreement_end_to_end_reports_the_curve():
    config = PruneConfig(calib=calib(64), min_agreement=0.9, rate=0.6)
    _, report = prune(wide_resnet(), config)
    search = report["budget"]
    assert search["min_agreement"] == 0.9 and search["trials"]
    agreement = report["calibration"]["fidelity"]["calibrated"]["top1_agreement"]
    assert (agreement >= 0.9) == search["met"]
    assert report["verify"]["passed"]


def test_min_agreement_options_are_checked():
    with pytest.raises(UserError, match="needs --calib"):
        resolve_min_agreement(PruneConfig(min_agreement=0.9))
    with pytest.raises(UserError, match="fraction"):
        resolve_min_agreement(PruneConfig(min_agreement=1.5, calib=calib()))
    # not the fidelity planner's structure: no search, the value is only the CI gate (test_gate.py)
    assert resolve_min_agreement(PruneConfig(min_agreement=0.9, calib=calib(), groups=8)) is None
    assert resolve_min_agreement(PruneConfig(calib=calib())) == 0.97  # the default with data
    assert resolve_min_agreement(PruneConfig(calib=calib(), target_macs=0.7)) is None  # explicit target wins
    assert resolve_min_agreement(PruneConfig()) is None


# -- command line --------------------------------------------------------------------------------

def test_cli_min_agreement_runs_the_budget_and_reports_it(tmp_path, capsys):
    import json

    import onnx

    from onnxprune.cli import main

    src, out, report = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(wide_resnet(), src)
    np.savez(tmp_path / "c.npz", input=calib(48)["input"])
    code = main([str(src), str(out), "--calib", str(tmp_path / "c.npz"), "--min-agreement", "0.9",
                 "--rate", "0.5", "--report", str(report), "-q"])
    assert code == 0 and out.exists()
    data = json.loads(report.read_text())
    assert data["budget"]["min_agreement"] == 0.9 and data["auto"]["planner"] == "fidelity"


@pytest.mark.parametrize("value", ["0", "1.5", "most"])
def test_cli_rejects_a_bad_min_agreement(tmp_path, capsys, value):
    import onnx

    from onnxprune.cli import main

    src = tmp_path / "m.onnx"
    onnx.save(wide_resnet(), src)
    with pytest.raises(SystemExit) as exc:
        main([str(src), str(tmp_path / "o.onnx"), "--min-agreement", value])
    assert exc.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


def test_cli_min_agreement_off_and_speed_planner_parse():
    from onnxprune.cli import build_parser

    args = build_parser().parse_args(["a.onnx", "b.onnx", "--min-agreement", "off", "--planner", "speed"])
    assert args.min_agreement is None and args.planner == "speed"
    assert build_parser().parse_args(["a.onnx", "b.onnx"]).min_agreement == "auto"


def test_predicted_macs_count_the_narrowed_depthwise_chain():
    """A G=1 cut of a project Conv narrows expand + depthwise too: the planner's MACs prediction
    must equal what the rewritten model really computes."""
    from graphs import inverted_residual

    model = inverted_residual(size=SIZE).model()
    _, report = prune(model, PruneConfig(target_macs=0.7, calib=calib(channels=3), min_agreement=None))
    assert report["verify"]["passed"]
    cut = [layer for layer in report["layers"] if "groups" in layer and layer["groups"] == 1]
    assert cut, "expected a G=1 cut"
    assert report["macs_after"] / report["macs_before"] == pytest.approx(report["auto"]["predicted_macs_ratio"],
                                                                         abs=1e-3)


# -- distillation in the pipeline -----------------------------------------------------------------

def test_distill_in_the_pipeline_changes_only_weights_and_is_reproducible():
    pytest.importorskip("torch")
    from onnxprune.distillation.distill import structure_problems

    base = dict(target_macs=0.75, calib=calib(48), min_agreement=None)
    plain, _ = prune(wide_resnet(), PruneConfig(**base))
    first, report = prune(wide_resnet(), PruneConfig(**base, distill=True, distill_steps=3))
    second, _ = prune(wide_resnet(), PruneConfig(**base, distill=True, distill_steps=3))
    assert report["distill"]["steps_done"] == 3
    assert structure_problems(plain, first) == []
    assert first.SerializeToString() == second.SerializeToString()
    # the distilled weights ship only when they lowered the held-out KL; else the refit ones do
    kept = report["distill"]["kept"]
    assert kept == report["distill"]["improved"]
    assert (first.SerializeToString() != plain.SerializeToString()) == kept


def test_distill_options_are_checked_before_any_work():
    with pytest.raises(UserError, match="needs --calib"):
        prune(wide_resnet(), PruneConfig(distill=True))
    with pytest.raises(UserError, match="distill-steps"):
        prune(wide_resnet(), PruneConfig(distill=True, calib=calib(), distill_steps=0))


def test_budget_uses_a_lower_confidence_bound_of_the_held_out_agreement():
    """63 of 64 held-out inputs agreeing (98.4%) is not evidence of 95%; 64 of 64 is."""
    assert budget.lower_bound(63 / 64, 64) < 0.95 < budget.lower_bound(1.0, 64)
    assert budget.lower_bound(0.97, 100_000) == pytest.approx(0.97, abs=1e-3)
    assert budget.lower_bound(0.5, 0) == 0.0


def test_a_slice_too_small_for_the_bound_is_judged_by_every_input_agreeing():
    """32 held-out inputs (128 calibration inputs): even 32/32 has a 90% lower bound of 95.1%, so
    the bound alone could never meet a 97% budget and every cut was refused."""
    assert budget.lower_bound(1.0, 32) < 0.97 <= budget.lower_bound(1.0, 54)
    assert budget.meets(1.0, 32, 0.97) == (True, "needs all 32 to agree")
    assert budget.meets(31 / 32, 32, 0.97) == (False, "needs all 32 to agree")
    assert budget.meets(1.0, 54, 0.97) == (True, "90% lower bound")
    assert budget.meets(53 / 54, 54, 0.97) == (False, "90% lower bound")  # no weaker than the small slice
    assert budget.meets(1.0, 10**6, 1.0) == (True, "needs all 1000000 to agree")  # a budget of 1 is reachable
    assert budget.meets(None, 32, 0.97) == (False, "unmeasurable")
    # too small to show anything: under 15 held-out inputs, or agreement on the inputs the refit was fitted to
    assert budget.meets(1.0, 14, 0.97) == (False, "too few held-out inputs (14)")
    assert budget.meets(1.0, 15, 0.97) == (True, "needs all 15 to agree")
    assert budget.meets(1.0, 12, 0.97, held_out=False) == (False, "too few held-out inputs (0)")


def test_budget_search_on_a_small_slice_cuts_where_every_held_out_input_agrees():
    def run(speed_plan):
        a = 1.0 if speed_plan.macs_ratio >= 0.8 else 31 / 32
        return ("plan", "model", {"fidelity": {"samples": 32, "on": "held-out samples",
                                               "calibrated": {"top1_agreement": a, "mean_kl": 0.0}}})

    first = FakePlan(0.5)
    result = budget.search_budget(FakePlanner(), 0.5, 0.97, first, run(first), run)
    assert result.met and result.chosen_target == pytest.approx(min(t for t in budget.target_grid(0.5) if t >= 0.8))
    assert {t["budget_test"] for t in result.trials} == {"needs all 32 to agree"}
    assert "judged by: needs all 32 to agree" in result.note


def test_calibration_data_is_read_once_per_run(tmp_path, monkeypatch):
    """The pipeline reads the calibration file once and hands the arrays to every stage: the
    sensitivity measurement and each calibration of a fidelity-budget search (several here)."""
    from onnxprune.calibration import calib_data

    path = tmp_path / "calib.npz"
    np.savez(path, **calib(64))
    reads = []
    original_read = calib_data._read_source
    monkeypatch.setattr(calib_data, "_read_source", lambda *a, **k: reads.append(1) or original_read(*a, **k))
    monkeypatch.setattr(budget, "meets", lambda *a, **k: (False, "refused"))  # every cut fails: several trials
    _, report = prune(wide_resnet(), PruneConfig(calib=str(path), min_agreement=0.999, rate=0.6))
    assert len(report["budget"]["trials"]) > 1 and reads == [1]
    assert report["calibration"]["source"] == str(path)


def test_unreachable_target_gives_the_deepest_plan_not_an_empty_one():
    """A MACs target far beyond what the candidates can save: each cut is smaller than one
    quantisation step of the (unreachable) need, so before the cap every saving rounded to 0 and
    the "deepest plan used" was no plan at all. Now the deepest cut of every layer is taken."""
    from onnxprune.planning.speed_plan import Outcome

    table = {f"L{i}": [Candidate(n, Option(1, n), saving, 0.0, cost)
                       for n, saving, cost in ((8, 100, 0.5), (12, 40, 0.1))] for i in range(3)}

    class Planner:
        def evaluate(self, rate, state):
            saved = sum(next(c.saving_macs for c in table[name] if c.option == option)
                        for name, option in state.items())
            return Outcome(rate, dict(state), 0.0, 1_000_000 - saved)

    dense = Outcome(0.0, {}, 0.0, 1_000_000)
    result = allocate.allocate(Planner(), table, dense, macs_limit=10_000)
    assert {name: option.n_keep for name, option in result.state.items()} == {"L0": 8, "L1": 8, "L2": 8}
    assert result.outcome.macs == 1_000_000 - 300
    assert result.notes == ["target not reachable with the candidate cuts; deepest plan used"]


def test_a_target_met_only_by_a_much_deeper_cut_says_so():
    """One layer holds the MACs and its cuts come in steps (64 -> 48 -> 32): a target of x0.70 is
    met first at x0.585 (a DNSMOS audio CNN); the plan is right, and the notes say it overshot."""
    from onnxprune.planning.speed_plan import Outcome, MACS_TOLERANCE

    table = {"big": [Candidate(n, Option(1, n), saving, 0.0, cost)
                     for n, saving, cost in ((48, 207_000, 0.1), (32, 415_000, 0.3))]}

    class Planner:
        def evaluate(self, rate, state):
            return Outcome(rate, dict(state), 0.0, 1_000_000 - sum(self._saved(n, state) for n in state))

        def local_macs(self, name, state):  # the layer alone: 800k MACs dense
            return 800_000 - self._saved(name, state)

        @staticmethod
        def _saved(name, state):
            return next((c.saving_macs for c in table[name] if c.option == state.get(name)), 0)

    dense = Outcome(0.0, {}, 0.0, 1_000_000)
    result = allocate.allocate(Planner(), table, dense, macs_limit=(0.70 + MACS_TOLERANCE) * 1_000_000)
    assert result.state["big"].n_keep == 32 and result.outcome.macs == 585_000
    assert result.notes == ["the nearest plan that meets the target cuts deeper than asked (MACs x0.585 for a "
                            "target of x0.700): the candidate cuts come in steps of the provider's channel alignment"]
    near = allocate.allocate(Planner(), table, dense, macs_limit=(0.79 + MACS_TOLERANCE) * 1_000_000)
    assert near.state["big"].n_keep == 48 and near.notes == []  # x0.793 for x0.79: no note


def _two_heads():
    """A class-score head (graph output 0, computed first in graph order) and a second head whose
    Convs come after it: the second head's layers reach only output 1."""
    from coupled_graphs import CoupledBuilder

    b = CoupledBuilder(size=8)
    x = b.relu(b.conv("input", 32, name="stem"))
    b.output(b.gemm(b.gap_flatten(x), 10))
    y = b.relu(b.conv(x, 32, name="branch"))
    b.output(b.conv(y, 32, k=1, name="box_head"))
    return b.model()


def test_a_layer_that_reaches_only_a_later_output_is_measured_on_it():
    """Regression: the probe model of a layer after the first output's producer had no first
    output (ORT: 'Graph output ... does not exist'); and a layer that does not reach output 0 must
    not look free."""
    model = normalize(_two_heads())
    data = {"input": np.random.default_rng(0).standard_normal((64, 3, 8, 8)).astype(np.float32)}
    report = measure(model, data, {"branch": [16], "box_head": [16]})
    for name in ("branch", "box_head"):
        assert report.layers[name].cost[0] > 1e-3, (name, report.layers[name].cost)
    _, pruned = prune(_two_heads(), PruneConfig(target_macs=0.7, calib=data, min_agreement=None))
    assert pruned["verify"]["passed"] and pruned["convs_pruned"] > 0


def _with_odd_outputs():
    """The two-head model plus outputs a change cannot be compared on sample by sample: a scalar
    statistic, ArgMax labels (int64) and NonZero of the box head (its count depends on the data)."""
    from onnx import TensorProto, helper

    model = _two_heads()
    scores, boxes = model.graph.output[0].name, model.graph.output[1].name
    model.graph.node.extend([
        helper.make_node("ReduceMean", [boxes], ["stat"], name="stat", keepdims=0),
        helper.make_node("ArgMax", [scores], ["labels"], name="labels", axis=1, keepdims=0),
        helper.make_node("Greater", [boxes, "zero"], ["positive"], name="positive"),
        helper.make_node("NonZero", ["positive"], ["where"], name="where")])
    model.graph.initializer.append(helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]))
    model.graph.output.extend([helper.make_tensor_value_info("stat", TensorProto.FLOAT, []),
                               helper.make_tensor_value_info("labels", TensorProto.INT64, ["N"]),
                               helper.make_tensor_value_info("where", TensorProto.INT64, [4, "K"])])
    return model


def test_outputs_that_are_not_per_sample_float_data_are_not_measured():
    from onnxprune.planning.sensitivity import graph_outputs

    model = normalize(_with_odd_outputs())
    data = {"input": np.random.default_rng(0).standard_normal((20, 3, 8, 8)).astype(np.float32)}
    measured = graph_outputs(model, data, 8)  # 8 + 8 + 4: the scalar would not concatenate
    assert sorted(measured) == sorted(o.name for o in model.graph.output[:2])
    assert all(len(v) == 20 for v in measured.values())


@pytest.mark.parametrize("coupled", ["auto", None])
def test_the_default_with_calibration_prunes_a_model_with_odd_outputs(coupled):
    """Regression: a scalar output failed to concatenate, a data-dependent one failed to compare
    once a cut changed its size, and integer labels were scored by the distance of class numbers."""
    data = {"input": np.random.default_rng(1).standard_normal((64, 3, 8, 8)).astype(np.float32)}
    _, report = prune(_with_odd_outputs(), PruneConfig(target_macs=0.7, calib=data, min_agreement=None,
                                                       coupled_rate=coupled))
    assert report["verify"]["passed"] and report["convs_pruned"] > 0
