"""The fidelity budget (``--min-agreement P``): the deepest plan whose calibrated output still
agrees with the original's top-1 on at least P of the held-out calibration inputs.

Why a search with real calibration and not the predicted cost: sensitivities are measured one
layer at a time and add up only approximately, while the layer-by-layer refit recovers part of
the damage; the only trustworthy number is the agreement of the refit model itself. Each trial
costs one planning + calibration pass (seconds on a CIFAR ResNet, ~half a minute on
MobileNetV2), so the search is a bisection on a fixed grid of MACs targets between the
requested depth (``--target-macs``, or what ``--rate`` leaves) and dense, assuming agreement
grows as fewer MACs are cut: the requested depth first (one trial when it already meets the
budget), then about log2(grid) more.

A trial meets the budget when the one-sided 90% Wilson lower bound of its held-out agreement
does (``lower_bound``): the held-out slice is small (with a budget the pipeline holds out a
quarter of the calibration inputs instead of an eighth), and the point estimate alone let a
plan through that lost 1.5 points on the full test set. A slice too small for the bound ever to
reach the budget (even with every input agreeing: fewer than ~54 held-out inputs, ~216
calibration inputs, for 0.97; any slice for a budget of 1) would make every cut fail, and the
default budget turned a 128-image ``--calib`` into a dense model after a futile search; there a
trial meets the budget when every held-out input agrees (``meets``), the strictest result such a
slice can show, from 15 held-out inputs on (below that, or with nothing held out, no cut is
shown to keep the budget), and the trial says which test judged it. When no cut meets the budget the result
is the dense model (nothing pruned), and the report says so. Every trial is reported: target,
predicted MACs and speedup, measured agreement, its lower bound and KL — the curve the choice
was made on.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..calibration.calib_stream import HELD_OUT

GRID_STEP = 0.05  # MACs-fraction spacing of the targets tried between the requested depth and dense
CONFIDENCE_Z = 1.2816  # one-sided 90%: the budget is met when the Wilson lower bound of agreement reaches it
SHALLOWEST = 0.98  # the mildest cut tried before giving up and keeping the model dense


@dataclass
class BudgetSearch:
    min_agreement: float
    requested: float
    chosen_plan: object  # SpeedPlan
    chosen: tuple  # (Plan as calibrate returned it, calibrated model, calibration report)
    chosen_target: float
    met: bool
    trials: list[dict] = field(default_factory=list)
    note: str = ""

    def as_dict(self) -> dict:
        return {"min_agreement": self.min_agreement, "requested_macs_target": round(self.requested, 4),
                "chosen_macs_target": round(self.chosen_target, 4), "met": self.met, "note": self.note,
                "measured_on": "held-out calibration inputs", "trials": self.trials}


def target_grid(deepest: float) -> list[float]:
    """Targets from ``deepest`` (first) towards dense, ``GRID_STEP`` apart, then ``SHALLOWEST``, then 1.0."""
    grid = [round(deepest, 4)]
    t = round(deepest + GRID_STEP, 4)
    while t < SHALLOWEST - 1e-9:
        grid.append(t)
        t = round(t + GRID_STEP, 4)
    return grid + [SHALLOWEST, 1.0] if deepest < SHALLOWEST else grid + ([1.0] if deepest < 1.0 else [])


def agreement_of(calibration: dict) -> float | None:
    return (calibration or {}).get("fidelity", {}).get("calibrated", {}).get("top1_agreement")


def lower_bound(agreement: float, samples: int, z: float = CONFIDENCE_Z) -> float:
    """Wilson score lower bound of a proportion measured on ``samples`` inputs.

    Why: the held-out slice is small (1/8 of the calibration inputs: 64 of 512), and 63/64 agreeing
    says little more than "above ~94%". Measured on the ResNet-20 sample, a plan whose 64 held-out
    inputs agreed at 98.4% agreed at 96.0% on the 10k test images. Requiring the bound, not the
    point estimate, to meet the budget makes a small calibration set err towards a milder cut."""
    if samples <= 0:
        return 0.0
    centre = agreement + z * z / (2 * samples)
    spread = z * (agreement * (1 - agreement) / samples + z * z / (4 * samples * samples)) ** 0.5
    return max(0.0, (centre - spread) / (1 + z * z / samples))


SMALLEST_SLICE_BOUND = 0.9  # "every held-out input agrees" counts from a slice whose perfect score shows 90%


def meets(agreement: float | None, samples: int, budget: float, held_out: bool = True) -> tuple[bool, str]:
    """(whether a trial's ``agreement`` on ``samples`` inputs meets ``budget``, the test used): the
    Wilson lower bound where a perfect score could reach the budget, else every held-out input
    agreeing (the module docstring) — but only on a held-out slice of at least 15 inputs (a
    perfect score's bound 90%): fewer calibration inputs than 16 hold none out, and agreement on
    the inputs the refit was fitted to says nothing (12 such inputs "all agreed" on a ResNet-20
    cut that agreed 95.8% on unseen images)."""
    if agreement is None:
        return False, "unmeasurable"
    if lower_bound(1.0, samples) >= budget:
        return lower_bound(agreement, samples) >= budget, "90% lower bound"
    if not held_out or lower_bound(1.0, samples) < SMALLEST_SLICE_BOUND:
        return False, f"too few held-out inputs ({samples if held_out else 0})"
    return agreement >= 1.0, f"needs all {samples} to agree"


def search_budget(planner, requested: float | None, budget: float, first_plan, first_result: tuple,
                  plan_and_calibrate, progress=None) -> BudgetSearch:
    """Bisection over ``target_grid``; ``plan_and_calibrate(speed_plan) -> (plan, model, calibration)``.

    ``plan`` is the one ``calibrate`` returned (with the kept channels the data chose), not the
    one it was given: the chosen trial's model is refit for it, so the rewrite must apply it."""
    deepest = requested if requested is not None else first_plan.macs_ratio
    grid = target_grid(deepest)
    results: dict[int, tuple] = {0: (first_plan, first_result)}
    trials: list[dict] = []

    def record(i: int) -> bool:
        speed_plan, result = results[i]
        calibration = result[2]
        agreement = agreement_of(calibration)
        fid = (calibration or {}).get("fidelity", {})
        samples = int(fid.get("samples", 0))
        bound = None if agreement is None else lower_bound(agreement, samples)
        met, test = meets(agreement, samples, budget, held_out=fid.get("on") == HELD_OUT)
        trials.append({"macs_target": grid[i], "predicted_macs_ratio": round(speed_plan.macs_ratio, 4),
                       "predicted_speedup": round(speed_plan.predicted_speedup, 3),
                       "top1_agreement": agreement, "agreement_lower_bound": bound,
                       "held_out_samples": fid.get("samples"),
                       "mean_kl": fid.get("calibrated", {}).get("mean_kl"),
                       "budget_test": test, "meets_budget": grid[i] >= 1.0 or met})
        if progress is not None:
            shown = 'n/a' if agreement is None else f'{agreement:.1%} (90% lower bound {bound:.1%})'
            if test.startswith("needs all"):  # the bound cannot reach the budget on this slice
                shown = f"{agreement:.1%} ({test}: too few for a 90% bound)"
            elif test.startswith("too few"):
                shown = f"{agreement:.1%} ({test} to judge it)"
            progress.stage(f"fidelity budget: MACs x{speed_plan.macs_ratio:.3f} -> top-1 agreement {shown}"
                           f" vs budget {budget:.1%}")
        return trials[-1]["meets_budget"]

    def evaluate(i: int) -> bool:
        if i not in results:
            speed_plan, _ = planner.plan(grid[i])
            if grid[i] >= 1.0:  # only ever the plan chosen when no cut keeps the budget
                speed_plan = kept_dense_by_budget(speed_plan, budget)
            results[i] = (speed_plan, plan_and_calibrate(speed_plan))
        return record(i)

    if agreement_of(first_result[2]) is None:
        return BudgetSearch(budget, deepest, first_plan, first_result, deepest, False, [],
                            "the model's first output is not class scores: agreement cannot be measured, "
                            "budget ignored")
    if evaluate(0):
        return BudgetSearch(budget, deepest, first_plan, first_result, grid[0], True, trials,
                            "the requested depth meets the budget")
    lo, hi = 0, len(grid) - 1  # lo fails; the last grid point is dense (always agrees)
    passed: dict[int, bool] = {0: False}
    while hi - lo > 1:
        mid = (lo + hi) // 2
        passed[mid] = evaluate(mid)
        lo, hi = (lo, mid) if passed[mid] else (mid, hi)
    if hi not in results:
        evaluate(hi)
    speed_plan, result = results[hi]
    met = grid[hi] < 1.0
    if grid[hi] >= 1.0:
        note = (f"no cut down to MACs x{SHALLOWEST} keeps {budget:.1%} top-1 agreement; the model is left dense "
                f"(lower --min-agreement or give more calibration data)")
    else:
        note = (f"the requested depth (MACs x{deepest:.3f}) does not keep {budget:.1%} agreement "
                f"(judged by: {trials[-1]['budget_test']}); used the deepest plan that does: "
                f"MACs x{speed_plan.macs_ratio:.3f}")
    trials.sort(key=lambda trial: trial["macs_target"])
    return BudgetSearch(budget, deepest, speed_plan, result, grid[hi], met, trials, note)


def kept_dense_by_budget(speed_plan, budget: float):
    """The dense plan with the budget as its layers' reason: the planner's own words ("no
    narrower width is predicted to save time") would send a user looking at the cost model when
    it was the fidelity budget that left them dense. Other reasons (too few channels, excluded)
    stay as they are."""
    reason = (f"auto: kept dense by the fidelity budget (no cut tried keeps top-1 agreement on held-out "
              f"calibration inputs at >= {budget:.1%}, 90% lower bound; see the report's budget)")
    configs = {name: {"skip": reason} if config.get("skip", "").startswith("auto: kept dense") else config
               for name, config in speed_plan.configs.items()}
    return replace(speed_plan, configs=configs)
