"""The whole pass, one visible step per stage: load → normalize → plan → calibrate → rewrite → verify →
(distill, check speed, accuracy) → report; README "How it works" walks through them.

``prune()`` is the Python API the ``onnxprune`` command (``commands/prune.py``) wraps; it never
reads ``argv``, prints or writes files (the command saves atomically). The report's core fields
are built in ``report.py``; each stage adds its own section here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import onnx

from . import __version__
from .errors import InternalError, PassFailed, UserError
from .checks.gate import AccuracyCheck, BudgetNotMet, check_measurable, evaluate_gates
from .checks.gate import check_options as check_gate_options
from .ir.model_io import cap_ir_version, load_model
from .ir.normalize import normalize, relist_initializer_inputs
from .planning.plan import Plan
from .report import Report, build_report
from .gkp.planner import PlanOptions, plan_model
from .channels.coupled import PROVENANCE_PREFIX as COUPLED_PROVENANCE
from .channels.coupled import lift, lower
from .channels.coupled import check_options as check_coupled
from .channels.coupled import from_allocation as coupled_from_allocation
from .channels.coupled import from_records as coupled_from_records
from .channels.coupled import narrowing_config
from .channels.coupled import prepare as prepare_coupled
from .planning.agreement_budget import BUDGET_HOLDOUT_DIVISOR, resolve_min_agreement
from .late_stages import check_convertible, check_distill, check_precision, distill_stage, fp16_stage
from .rewriting.grouped_forms import grouped_convs, to_form
from .rewriting.rewrite import apply_plan
from .ir.shapes import check_given, resolve_input_shapes, restore_input_dims, verification_shapes, with_input_shapes
from .ir.shapes import describe as describe_shapes
from .ir.shapes import sizes_text
from .checks.verify import DEFAULT_TOLERANCE, check_runs, check_runs_on_calibration, verify


@dataclass
class PruneConfig(PlanOptions):
    groups: int | str = "auto"  # speed-aware per-layer choice by default; an int applies G everywhere
    # shapes for symbolic input dims ({name: dims} or [(name or None, dims)]); see shapes.py
    input_shapes: object = None
    tickets: list = field(default_factory=list)  # paths or ModelProtos of training snapshots
    plan: Plan | None = None  # apply this plan instead of planning
    verify: bool = True
    tolerance: float = DEFAULT_TOLERANCE
    # speed-aware planning (groups="auto", see speed_plan.py)
    provider: str = "cpu"
    target_macs: float | None = None  # fraction of the dense model's MACs to keep
    target_speedup: float | None = None
    latency_table: str | None = None  # autotune cache; None = analytical cost model
    check_speed: bool = False
    # calibration-data recovery (see calibrate.py)
    calib: object = None  # path (.npz/.npy/folder) or {input name: array}
    calib_size: int | None = None
    calib_selection: str = "data"  # kept channels: "data" (data-aware where it refits better) or "weights" (plan)
    calib_layers: str = "all"  # refit "all" layers after the first pruned one, or only the "pruned" ones
    calib_target: str = "residual"  # what a Conv feeding a residual Add is fit to: "residual" (the sum) or "output"
    calib_holdout_divisor: int | None = None  # 1/N of the samples held out for fidelity (None: 8, or 4 with a budget)
    # fidelity-aware planning (see fidelity_plan.py, budget.py)
    planner: str = "fidelity"  # "fidelity": cuts chosen by measured output change per MAC; "speed": rate scan
    min_agreement: float | str | None = "auto"  # top-1 agreement budget on held-out calibration inputs
    # label-free distillation after the rewrite (see distill.py; needs torch and calib)
    distill: bool = False
    distill_time: float = 300.0  # seconds of training (probe + steps); the step count is reported
    distill_steps: int | None = None  # a fixed step count instead of the time budget (reproducible bytes)
    # CI gates (see gate.py): labelled data whose top-1 accuracy is measured before and after, and
    # the most it may drop (percentage points); an explicit min_agreement and check_speed are gates too
    eval_data: object = None  # .npz path with 'images' and 'labels', an evaluate.Dataset or a gate.AccuracyCheck
    max_accuracy_drop: float | None = None
    # coupled channel groups (see coupled.py): fraction of each residual stream / Concat / SE group removed
    # "auto": the fidelity planner offers coupled groups' cuts beside the single-Conv ones (where it
    # plans: --groups auto, no --plan-in/--tickets); a fraction: that much of every group; None: off
    coupled_rate: float | str | None = "auto"
    g1_only: tuple[str, ...] = ()  # set by the pass: Convs writing a narrowed group (G=1 cuts only)
    fixed_channels: tuple[str, ...] = ()  # set by the pass: Convs whose kept channels a group decided
    # the output's float type (see precision.py): "fp32" (as computed) or "fp16" (fp32 inputs/outputs)
    precision: str = "fp32"
    fp16_tolerance: float | None = None  # None: FP16_TOLERANCE


class Progress:
    """Receives progress events; the default one is silent."""

    def stage(self, message: str) -> None:
        pass

    def layer(self, done: int, total: int, name: str) -> None:
        pass


def prune(model_or_path, config: PruneConfig | None = None, progress: Progress | None = None):
    """Prune ``model_or_path`` (path or ModelProto) -> ``(pruned ModelProto, Report)``."""
    config = config or PruneConfig()
    asked = config  # the options as given: the pass adds its own (exclusions, per-layer configs) to ``config``
    progress = progress or Progress()
    timings = {}
    started = time.perf_counter()
    check_distill(config)
    check_precision(config)
    check_coupled(config)
    budget = resolve_min_agreement(config)  # option errors before any work
    check_gate_options(config)

    progress.stage("loading")
    original = load_model(model_or_path)
    check_convertible(config, original)
    cap_ir_version(original)
    given = check_given(original, config.input_shapes)  # option errors before any work
    snapshots = []
    for i, ticket in enumerate(config.tickets):
        try:
            snapshots.append(normalize(load_model(ticket)))
        except UserError as exc:
            raise UserError(f"ticket snapshot #{i + 1}: {exc}") from None
    feeds, calib_notes = None, []
    if config.calib is not None:
        from .calibration.calib_data import load_calibration_inputs

        shaped = {name: shape for name, shape in resolve_input_shapes(original, given).items() if name in given}
        feeds = load_calibration_inputs(config.calib, with_input_shapes(original, shaped),
                                        config.calib_size, calib_notes)  # fail before minutes of work
    # labelled data read and the input model run on it now: a bad file fails before planning
    accuracy = config.eval_data
    if accuracy is not None and not isinstance(accuracy, AccuracyCheck):
        accuracy = AccuracyCheck.prepare(original, accuracy)
    shapes = resolve_input_shapes(original, given, feeds)
    working = with_input_shapes(original, shapes)  # every stage works at these shapes
    if describe_shapes(shapes):
        progress.stage(describe_shapes(shapes))
        check_runs(working, config.seed)  # a shape the model cannot run at fails now, not after planning
    if feeds is not None:
        first_output = check_runs_on_calibration(working, feeds)  # calibration's batches too, before any planning
        check_measurable(config, working, first_output)
    also_verify = []  # further --input-shape sizes; one that resolves to the working shape adds nothing
    for extra in verification_shapes(original, config.input_shapes):
        resolved = resolve_input_shapes(original, extra, feeds)
        if any(resolved[n].dims != shapes[n].dims for n in resolved) and resolved not in also_verify:
            also_verify.append(resolved)
    for extra in also_verify:
        check_runs(with_input_shapes(original, extra), config.seed)
    t = _lap(timings, "load", started)

    progress.stage("normalizing (folding BatchNormalization and per-channel affine ops)")
    model = normalize(working)
    t = _lap(timings, "normalize", t)

    coupled, plan_base = None, model  # plan_base: the model the single-Conv planner plans
    auto = config.plan is None and (config.groups == "auto" or config.target_macs is not None
                                    or config.target_speedup is not None)
    auto_groups = config.coupled_rate == "auto" and auto and config.planner == "fidelity" and not config.tickets
    fixed_groups = config.coupled_rate not in (None, "auto", "off")
    replayed_groups = config.plan is not None and bool(config.plan.coupled)  # a replayed plan's coupled cuts
    symbolic_dims = (_with_input_dims_of(model, original) if auto_groups or fixed_groups or replayed_groups
                     else None)
    if fixed_groups:
        coupled, plan_base, config = prepare_coupled(model, symbolic_dims, config, feeds, progress)
        t = _lap(timings, "couple", t)
    elif replayed_groups:
        coupled = coupled_from_records(model, symbolic_dims, config.plan, config)
        config = narrowing_config(config, coupled)
        t = _lap(timings, "couple", t)
    dense = model

    def make_plan(options: PruneConfig, layer_progress=None, groups_of=None) -> tuple[Plan, object, PruneConfig]:
        """(the plan on the dense model, its CoupledPlan or None, the options to calibrate it with).
        ``groups_of``: the speed plan whose coupled group cuts (``--coupled-rate auto``) this plan
        has; the single-Conv plan is then made on the narrowed model and lifted back (the groups'
        readers, see coupled.py), and calibration keeps the readers' channels."""
        chosen, base = coupled, plan_base
        if groups_of is not None:
            chosen = coupled_from_allocation(dense, fidelity_planner, groups_of)
            if chosen.narrowed is not None:
                base, options = chosen.narrowed, narrowing_config(options, chosen)
        made = plan_model(base, options, snapshots, layer_progress)
        return (lift(made, chosen, dense) if base is not dense else made), chosen, options

    speed_plan = search = fidelity_planner = None

    def planned(speed_plan) -> str:
        """The planner's line; after --coupled-rate's narrowing its figures are of the narrowed
        model, so the line says so and how much the narrowing took (the run's end counts both)."""
        from .ir.macs import count_macs
        from .planning.speed_plan import describe

        text = describe(speed_plan)
        if plan_base is not dense:
            cut = 1 - count_macs(plan_base)[0] / max(count_macs(dense)[0], 1)
            text += (f"; these figures are on top of --coupled-rate's narrowing of the coupled channel groups, "
                     f"which removed {100 * cut:.1f}% of the MACs")
        return text

    if budget is not None and config.calib_holdout_divisor is None:
        # the budget is judged on the held-out slice: a quarter of the inputs resolves ~1% steps
        config = replace(config, calib_holdout_divisor=BUDGET_HOLDOUT_DIVISOR)
    if auto and config.planner == "speed":
        from .planning.speed_plan import plan_speed

        progress.stage(f"choosing groups and kept channels per layer for the {config.provider} provider")
        speed_plan = plan_speed(plan_base, config)
        progress.stage(planned(speed_plan))
        structure = f"speed planner: fastest predicted cut ({speed_plan.cost_source}) at the MACs/speed target"
        config = replace(config, layer_configs=_sourced(speed_plan.configs, structure))
    elif auto:
        from .planning.fidelity_plan import FidelityPlanner

        with_groups = " (coupled channel groups included)" if auto_groups else ""
        progress.stage(f"measuring how much each candidate cut{with_groups} changes the output on the calibration "
                       f"data" if feeds else f"ranking candidate cuts{with_groups} by a data-free proxy (no --calib: "
                       f"fidelity unmeasured)")
        fidelity_planner = FidelityPlanner(plan_base, config, feeds, progress.layer,
                                           coupled_also_in=[symbolic_dims] if auto_groups else None)
        target = fidelity_planner.default_target()
        speed_plan, _ = fidelity_planner.plan(target, config.target_speedup)
        t = _lap(timings, "sensitivity", t)
        progress.stage(planned(speed_plan))
        structure = ("fidelity planner: least total output KL measured on the calibration data" if feeds else
                     "fidelity planner: least weight-norm proxy (no --calib: fidelity unmeasured)") + \
            ", within the MACs/speed target (knapsack)"
        config = replace(config, layer_configs=_sourced(speed_plan.configs, structure))
    groups_of = speed_plan if auto_groups and fidelity_planner is not None else None
    if config.plan is None:
        progress.stage("planning")
        # trials of the budget search start from the options before any group's narrowing
        plan_options = config
        plan, coupled, config = make_plan(config, progress.layer, groups_of)
    else:
        for layer in config.plan.layers:  # a hand-made plan (Python API) is checked as --plan-in's are
            layer.validate()
        plan = _as_given(config.plan)
    t = _lap(timings, "plan", t)

    calibration = None
    if config.calib is not None:
        from .calibration.calibrate import calibrate

        progress.stage("calibrating: refitting the pruned layers" + (" and the dense ones after them"
                       if config.calib_layers == "all" else "") + " in graph order")
        result = calibrate(model, plan, config, progress, feeds, calib_notes)
        # from here on the plan is the calibrated one: the kept channels the data chose, which the
        # refit weights are zero outside of (rewrite and verification must follow it)
        plan, calibrated, calibration = result.plan, result.model, result.report
        if fidelity_planner is not None and budget is not None:
            from .planning.budget import search_budget

            def plan_and_calibrate(candidate):
                trial = replace(plan_options, layer_configs=_sourced(candidate.configs, structure + ", at the depth "
                                                                                           "--min-agreement chose"))
                trial_plan, _, trial = make_plan(trial, None, candidate if auto_groups else None)
                tried = calibrate(model, trial_plan, trial, None, feeds, calib_notes)
                return tried.plan, tried.model, tried.report

            search = search_budget(fidelity_planner, target, budget, speed_plan, (plan, calibrated, calibration),
                                   plan_and_calibrate, progress)
            speed_plan, (plan, calibrated, calibration) = search.chosen_plan, search.chosen
            if auto_groups:  # the chosen depth's own group cuts
                coupled = coupled_from_allocation(dense, fidelity_planner, speed_plan)
        model = calibrated
    t = _lap(timings, "calibrate", t)

    progress.stage("rewriting")
    # rewritten with the input's own (symbolic) dims, so no rewrite decision rests on a size that
    # holds only at the working shape (a map that is 1x1 there), and the output keeps them
    symbolic = _with_input_dims_of(model, original)
    if coupled is None or coupled.narrowed is None:
        pruned = apply_plan(symbolic, plan)
    else:  # coupled groups removed first, then the single-Conv plan on the narrowed graph
        narrowed = coupled.apply(symbolic)
        pruned = apply_plan(narrowed, lower(plan, coupled, symbolic, narrowed))
    gpu_form = None
    if config.provider == "cuda" and grouped_convs(pruned):
        # cuDNN's grouped Convs ran 3-10x slower than dense on an H100; of the exact forms measured
        # the union one is fastest (benchmarks/README.md, eighth session): emitted for --provider cuda
        progress.stage("writing grouped layers in their GPU form (a dense Conv over the union of their channels)")
        pruned, gpu_form = to_form(pruned, "union")
    relist_initializer_inputs(pruned, original.ir_version)
    value = f"{__version__}; {len(plan.layers)} Convs grouped-kernel pruned"
    if gpu_form is not None:
        value += f"; {len(gpu_form['changed'])} grouped Convs in union form (--provider cuda)"
    _stamp(pruned, value)
    t = _lap(timings, "rewrite", t)

    try:
        onnx.checker.check_model(pruned, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise InternalError(f"the rewritten model fails onnx.checker: {exc}") from exc

    verified = None
    if config.verify:
        progress.stage("verifying against the masked dense model in ONNX Runtime")
        verified = _verified(model, pruned, plan, config, original)
        for extra in also_verify:  # further --input-shape sizes of an input
            sizes = sizes_text(extra)
            progress.stage(f"verifying again at {sizes}")
            at = _verified(with_input_shapes(symbolic, extra), with_input_shapes(pruned, extra), plan, config, original,
                           f" at {sizes}")
            verified.other_shapes.append({"input_shapes": sizes, "max_rel_diff": at.max_rel_diff, "passed": at.passed})
    t = _lap(timings, "verify", t)

    distilled = None
    if config.distill:
        pruned, distilled = distill_stage(pruned, original, feeds, config, progress)
    t = _lap(timings, "distill", t)

    pruned32, precision = pruned, None  # the report's MACs/params are the fp32 model's (the same graph)
    if config.precision == "fp16":
        pruned, precision = fp16_stage(pruned, model, dense, plan, distilled, feeds, calibration, config, shapes,
                                       progress, symbolic, also_verify)
        t = _lap(timings, "precision", t)

    speed = None
    if config.check_speed:
        from .checks.bench import check_speed

        progress.stage(f"measuring latency on the {config.provider} provider (--check-speed)")
        speed = check_speed(with_input_shapes(original, shapes), with_input_shapes(pruned, shapes), config.provider,
                            fail=False)  # judged with the other gates below
    t = _lap(timings, "check_speed", t)

    accuracy_report = None
    if accuracy is not None:
        progress.stage("measuring top-1 accuracy on the labelled --eval-data")
        accuracy_report = accuracy.measure(pruned)
    t = _lap(timings, "accuracy", t)

    if coupled is not None and coupled.cuts and not plan.coupled:  # the plan records its groups (--plan-out)
        plan = replace(plan, coupled=[cut.record() for cut in coupled.cuts])
    report = build_report(original, model, pruned32, plan, verified, asked, shapes)
    report["auto"] = None if speed_plan is None else {
        "rate": speed_plan.rate, "predicted_speedup": round(speed_plan.predicted_speedup, 3),
        "predicted_macs_ratio": round(speed_plan.macs_ratio, 4), "cost_model": speed_plan.cost_source,
        "notes": speed_plan.notes}
    if fidelity_planner is not None:
        report["auto"]["planner"] = "fidelity"
        report["sensitivity"] = fidelity_planner.sensitivity_report()
    report["budget"] = None if search is None else search.as_dict()
    report["coupled"] = None if coupled is None else coupled.as_dict()
    report["calibration"] = calibration
    report["distill"] = distilled
    report["speed"] = speed
    report["accuracy"] = accuracy_report
    if precision is not None:
        report["precision"] = precision
    report["gates"] = evaluate_gates(report, config)
    _lap(timings, "report", t)
    report["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    report["timings_s"]["total"] = round(time.perf_counter() - started, 3)
    failed = [gate for gate in report["gates"] if not gate["passed"]]
    if failed:
        raise BudgetNotMet(pruned, Report(report, plan), failed)
    return pruned, Report(report, plan)


def _verified(reference, rewritten, plan: Plan, config: PruneConfig, original, where: str = ""):
    """``verify`` -> its result, or ``PassFailed`` saying why (``where``: at which input sizes)."""
    result = verify(reference, rewritten, plan, tolerance=config.tolerance, seed=config.seed, original=original)
    if result.new_required_inputs:
        raise PassFailed(f"verification failed{where}: the rewritten model requires input(s) "
                         f"{', '.join(map(repr, result.new_required_inputs))} that the input model does not")
    if not result.passed:
        raise PassFailed(f"verification failed{where}: rewritten model differs from the masked original by "
                         f"{result.max_rel_diff:.3g} (relative), tolerance {result.tolerance:g}"
                         + (f"; {result.note}" if result.note else ""))
    return result


def _as_given(plan: Plan) -> Plan:
    """A given plan (``--plan-in`` or the Python API's ``config.plan``) as a new ``Plan`` whose
    layers say they were applied as saved, with what the saving run recorded (if any).

    Why new objects: the caller's plan is theirs (the Python API may apply one plan to several
    models); stamping its provenance in place would change it under them, and a second run
    would wrap "--plan-in (saved: --plan-in ...)" again."""
    if not plan.coupled and any(str((layer.provenance or {}).get("structure", "")).startswith(COUPLED_PROVENANCE)
                                for layer in plan.layers):
        raise UserError("this plan narrows coupled channel groups (residual streams, Concat/Split, SE gates) but was "
                        "saved before plans recorded them (plan version < 3); prune the model again with the same "
                        "options and --plan-out (or --coupled-rate off for a plan without them)")

    def stamped(layer):
        saved = layer.provenance or {}
        return replace(layer, provenance={
            "structure": "--plan-in" + (f" (saved: {saved['structure']})" if saved.get("structure") else ""),
            "channels": "--plan-in" + (f" (saved: {saved['channels']})" if saved.get("channels") else ""),
            "kept_fraction": round(layer.kept_per_group / layer.c_in, 4)})
    return replace(plan, layers=[stamped(layer) for layer in plan.layers])


def _sourced(configs: dict[str, dict], structure: str) -> dict[str, dict]:
    """The planner's per-layer configs, each carrying who decided it (``LayerPlan.provenance``)."""
    return {name: {**config, "source": structure} for name, config in configs.items()}


def _stamp(model: onnx.ModelProto, value: str) -> None:
    """Record this pass in the ``onnxprune`` metadata entry. An input that an earlier pass wrote
    keeps that pass's entry under ``onnxprune.input`` (replaced, not repeated: duplicate keys fail
    onnx.checker, so pruning an onnxprune output again must not add a second entry)."""
    props = model.metadata_props
    earlier = [entry.value for entry in props if entry.key == "onnxprune"]
    kept = [(entry.key, entry.value) for entry in props if entry.key not in ("onnxprune", "onnxprune.input")]
    del props[:]
    for key, text in kept:
        props.add(key=key, value=text)
    if earlier:
        props.add(key="onnxprune.input", value=earlier[-1])  # an older writer's duplicates: its last pass
    props.add(key="onnxprune", value=value)


def _with_input_dims_of(model: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    restore_input_dims(copy, original)
    return copy


def _lap(timings: dict, name: str, since: float) -> float:
    now = time.perf_counter()
    timings[name] = now - since
    return now
