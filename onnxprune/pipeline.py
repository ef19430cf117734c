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
from .gate import AccuracyCheck, BudgetNotMet, evaluate_gates
from .gate import check_options as check_gate_options
from .model_io import cap_ir_version, load_model
from .normalize import normalize, relist_initializer_inputs
from .plan import Plan
from .report import Report, build_report
from .planner import PlanOptions, plan_model
from .coupled import STRUCTURE as COUPLED_STRUCTURE
from .coupled import lift, lower
from .rewrite import apply_plan
from .shapes import check_given, resolve_input_shapes, restore_input_dims, verification_shapes, with_input_shapes
from .shapes import describe as describe_shapes
from .verify import DEFAULT_TOLERANCE, check_runs, verify


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
    coupled_rate: float | None = None
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
    progress = progress or Progress()
    timings = {}
    started = time.perf_counter()
    _check_distill(config)
    _check_precision(config)
    budget = resolve_min_agreement(config)  # option errors before any work
    check_gate_options(config)

    progress.stage("loading")
    original = load_model(model_or_path)
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
        from .calib_data import load_calibration_inputs

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
    if config.coupled_rate is not None:
        coupled, plan_base, config = _couple(model, _with_input_dims_of(model, original), config, feeds, progress)
        t = _lap(timings, "couple", t)
    narrowing, dense = plan_base is not model, model  # with groups: the rest planned narrowed, then lifted

    def make_plan(options: PruneConfig, layer_progress=None) -> Plan:
        """The single-Conv plan, on the dense model (with the coupled groups' readers, see coupled.py)."""
        made = plan_model(plan_base, options, snapshots, layer_progress)
        return lift(made, coupled, dense) if narrowing else made

    speed_plan = search = fidelity_planner = None
    if budget is not None and config.calib_holdout_divisor is None:
        # the budget is judged on the held-out slice: a quarter of the inputs resolves ~1% steps
        config = replace(config, calib_holdout_divisor=BUDGET_HOLDOUT_DIVISOR)
    auto = config.plan is None and (config.groups == "auto" or config.target_macs is not None
                                    or config.target_speedup is not None)
    if auto and config.planner == "speed":
        from .speed_plan import describe, plan_speed

        progress.stage(f"choosing groups and kept channels per layer for the {config.provider} provider")
        speed_plan = plan_speed(plan_base, config)
        progress.stage(describe(speed_plan))
        structure = f"speed planner: fastest predicted cut ({speed_plan.cost_source}) at the MACs/speed target"
        config = replace(config, layer_configs=_sourced(speed_plan.configs, structure))
    elif auto:
        from .fidelity_plan import FidelityPlanner
        from .speed_plan import describe

        progress.stage("measuring how much each candidate cut changes the output on the calibration data"
                       if feeds else "ranking candidate cuts by a data-free proxy (no --calib: fidelity unmeasured)")
        fidelity_planner = FidelityPlanner(plan_base, config, feeds, progress.layer)
        target = fidelity_planner.default_target()
        speed_plan, _ = fidelity_planner.plan(target, config.target_speedup)
        t = _lap(timings, "sensitivity", t)
        progress.stage(describe(speed_plan))
        structure = ("fidelity planner: least total output KL measured on the calibration data" if feeds else
                     "fidelity planner: least weight-norm proxy (no --calib: fidelity unmeasured)") + \
            ", within the MACs/speed target (knapsack)"
        config = replace(config, layer_configs=_sourced(speed_plan.configs, structure))
    if config.plan is None:
        progress.stage("planning")
        plan = make_plan(config, progress.layer)
    else:
        for layer in config.plan.layers:  # a hand-made plan (Python API) is checked as --plan-in's are
            layer.validate()
        plan = _as_given(config.plan)
    t = _lap(timings, "plan", t)

    calibration = None
    if config.calib is not None:
        from .calibrate import calibrate

        progress.stage("calibrating: refitting the pruned layers" + (" and the dense ones after them"
                       if config.calib_layers == "all" else "") + " in graph order")
        result = calibrate(model, plan, config, progress, feeds, calib_notes)
        # from here on the plan is the calibrated one: the kept channels the data chose, which the
        # refit weights are zero outside of (rewrite and verification must follow it)
        plan, calibrated, calibration = result.plan, result.model, result.report
        if fidelity_planner is not None and budget is not None:
            from .budget import search_budget

            def plan_and_calibrate(candidate):
                trial = replace(config, layer_configs=_sourced(candidate.configs, structure + ", at the depth "
                                                                                     "--min-agreement chose"))
                tried = calibrate(model, make_plan(trial), trial, None, feeds, calib_notes)
                return tried.plan, tried.model, tried.report

            search = search_budget(fidelity_planner, target, budget, speed_plan, (plan, calibrated, calibration),
                                   plan_and_calibrate, progress)
            speed_plan, (plan, calibrated, calibration) = search.chosen_plan, search.chosen
        model = calibrated
    t = _lap(timings, "calibrate", t)

    progress.stage("rewriting")
    # rewritten with the input's own (symbolic) dims, so no rewrite decision rests on a size that
    # holds only at the working shape (a map that is 1x1 there), and the output keeps them
    symbolic = _with_input_dims_of(model, original)
    if not narrowing:
        pruned = apply_plan(symbolic, plan)
    else:  # coupled groups removed first, then the single-Conv plan on the narrowed graph
        narrowed = coupled.apply(symbolic)
        pruned = apply_plan(narrowed, lower(plan, coupled, symbolic, narrowed))
    relist_initializer_inputs(pruned, original.ir_version)
    entry = pruned.metadata_props.add()
    entry.key, entry.value = "onnxprune", f"{__version__}; {len(plan.layers)} Convs grouped-kernel pruned"
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
            sizes = ", ".join(f"{name}={shape.text()}" for name, shape in extra.items())
            progress.stage(f"verifying again at {sizes}")
            at = _verified(with_input_shapes(symbolic, extra), with_input_shapes(pruned, extra), plan, config, original,
                           f" at {sizes}")
            verified.other_shapes.append({"input_shapes": sizes, "max_rel_diff": at.max_rel_diff, "passed": at.passed})
    t = _lap(timings, "verify", t)

    distilled = None
    if config.distill:
        pruned, distilled = _distill(pruned, original, feeds, config, progress)
    t = _lap(timings, "distill", t)

    pruned32, precision = pruned, None  # the report's MACs/params are the fp32 model's (the same graph)
    if config.precision == "fp16":
        pruned, precision = _to_fp16(pruned, model, dense, plan, distilled, feeds, calibration, config, shapes,
                                     progress)
        t = _lap(timings, "precision", t)

    speed = None
    if config.check_speed:
        from .bench import check_speed

        progress.stage(f"measuring latency on the {config.provider} provider (--check-speed)")
        speed = check_speed(with_input_shapes(original, shapes), with_input_shapes(pruned, shapes), config.provider,
                            fail=False)  # judged with the other gates below
    t = _lap(timings, "check_speed", t)

    accuracy_report = None
    if accuracy is not None:
        progress.stage("measuring top-1 accuracy on the labelled --eval-data")
        accuracy_report = accuracy.measure(pruned)
    t = _lap(timings, "accuracy", t)

    report = build_report(original, model, pruned32, plan, verified, config, shapes)
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


# 0.97: on the Fashion-MNIST ResNets 96% test agreement meant -1.5 points of accuracy, 97-98% under 1
DEFAULT_MIN_AGREEMENT = 0.97
DISTILL_THREADS = 1  # torch threads for --distill: the step results depend on it (bytes), and one
# thread was ~10x faster than two on a loaded 2-core machine
BUDGET_HOLDOUT_DIVISOR = 4  # with a fidelity budget, 1/4 of the calibration inputs is held out (else 1/8)


def check_agreement(value: float) -> float:
    """A fidelity budget is a fraction in (0, 1]."""
    if not 0.0 < value <= 1.0:
        raise UserError(f"--min-agreement is a fraction in (0, 1], got {value}")
    return value


def resolve_min_agreement(config: PruneConfig) -> float | None:
    """The fidelity budget the planner searches for: an explicit ``min_agreement``; with ``"auto"``
    (the default) ``DEFAULT_MIN_AGREEMENT`` when calibration data is given and no explicit
    MACs/speed target is (an explicit target is the user's choice and is kept); else none.

    Where the structure is not the fidelity planner's to choose (``--groups N``, ``--plan-in``,
    ``--planner speed``, ``--coupled-rate``: its cut is fixed before the planner runs) an explicit
    value is not searched for: it is only the CI gate (``gate.py``) on the result."""
    if config.planner not in ("fidelity", "speed"):
        raise UserError(f"--planner must be 'fidelity' or 'speed', got {config.planner!r}")
    value = config.min_agreement
    fidelity_auto = config.plan is None and config.planner == "fidelity" and config.coupled_rate is None and (
        config.groups == "auto" or config.target_macs is not None or config.target_speedup is not None)
    if value == "auto":
        explicit = config.target_macs is not None or config.target_speedup is not None
        return DEFAULT_MIN_AGREEMENT if fidelity_auto and config.calib is not None and not explicit else None
    if value is None:
        return None
    value = check_agreement(float(value))
    if config.calib is None:
        raise UserError("--min-agreement needs --calib (agreement is measured on held-out calibration inputs)")
    return value if fidelity_auto else None


def _check_distill(config: PruneConfig) -> None:
    """--distill's needs, checked before minutes of planning."""
    if not config.distill:
        return
    if config.calib is None:
        raise UserError("--distill needs --calib (the unlabelled images it trains on)")
    if config.distill_steps is not None and config.distill_steps < 1:
        raise UserError(f"--distill-steps must be >= 1, got {config.distill_steps}")
    if config.distill_steps is None and not config.distill_time > 0:
        raise UserError(f"--distill-time must be positive, got {config.distill_time}")
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise UserError("--distill needs PyTorch: pip install 'onnxprune[distill]'")


def _distill(pruned, original, feeds, config: PruneConfig, progress: Progress):
    """Fine-tune the rewritten model's weights towards the original's outputs (structure fixed).

    Runs after verification: the exactness oracle has proven the *structure* (the rewrite equals
    the masked original), and distillation may then only change weight values — checked here
    with ``distill.structure_problems`` (same nodes, names, shapes, dtypes; only Conv/Gemm
    weights and biases differ)."""
    from .calib_stream import split_holdout
    from .distill import UnsupportedModel, distill, structure_problems

    # the calibration's held-out slice stays held out: trained on the fit part, measured on it
    fit, held = split_holdout(feeds, divisor=config.calib_holdout_divisor)
    how = f"{config.distill_steps} steps" if config.distill_steps else f"{config.distill_time:g} s"
    progress.stage(f"distilling: fine-tuning the pruned weights towards the original's outputs ({how})")
    try:
        student, report = distill(pruned, original, fit, eval_images=held if len(next(iter(held.values()))) else None,
                                  seed=config.seed, threads=DISTILL_THREADS,
                                  steps=config.distill_steps,
                                  time_budget_s=None if config.distill_steps else config.distill_time)
    except UnsupportedModel as exc:
        progress.stage(f"distillation skipped: {exc}")
        return pruned, {"skipped": str(exc)}
    problems = structure_problems(pruned, student)
    if problems:
        raise InternalError(f"distillation changed the model's structure: {problems[0]}")
    if report.get("improved") is False or report.get("diverged"):
        report["kept"] = False  # held-out KL did not drop: ship the verified refit weights instead
        progress.stage("distillation did not lower the held-out KL: keeping the refit weights")
        return pruned, report
    report["kept"] = True
    return student, report


# fp16 verification tolerance, relative to each output's scale (as verify.py's 1e-4 is): fp16's unit
# roundoff is 4.9e-4 and rounding ResNet-20's weights alone moves its logits by 4e-4 of their
# scale; on a GPU the activations are rounded at every layer too (a few 1e-3 after ~20 layers).
# 1e-2 (~20 roundoffs) leaves that room, while a lost Cast, a wrong or corrupted weight or an
# overflow moves the output by 1e-1 or more.
FP16_TOLERANCE = 1e-2


def _check_precision(config: PruneConfig) -> None:
    if config.precision not in ("fp32", "fp16"):
        raise UserError(f"--precision must be 'fp32' or 'fp16', got {config.precision!r}")
    if config.fp16_tolerance is not None and not config.fp16_tolerance > 0:
        raise UserError(f"the fp16 tolerance must be positive, got {config.fp16_tolerance}")


def _to_fp16(pruned32, model, dense, plan: Plan, distilled, feeds, calibration, config: PruneConfig, shapes,
             progress: Progress):
    """The fp32 output converted to fp16 (``precision.py``) and checked -> (model, report section).

    The check (unless ``--no-verify``): seeded random inputs as for the fp32 verification, the
    fp16 model against the masked fp32 model (verification's own reference, so fp16 is judged
    against the oracle, not against the rewrite it came from), or, when distillation changed the
    weights, against the distilled fp32 model (its weights have no masked counterpart), at
    ``FP16_TOLERANCE``; failing it fails the pass. With calibration inputs also the top-1
    agreement of fp16 with the fp32 pruned model on all of them (no fitting involves the fp16
    rounding, so none need holding out; more inputs resolve it finer), and the fp16 model's
    fidelity to the input next to calibration's own (same held-out slice)."""
    from .calib_stream import batch_size, compare_first_output, count, first_output, split_holdout
    from .precision import to_fp16
    from .verify import compare_models, masked_model

    progress.stage("converting to fp16 (fp32 inputs and outputs; overflow-prone ops kept in fp32)")
    half, facts = to_fp16(pruned32)
    for entry in half.metadata_props:
        if entry.key == "onnxprune":
            entry.value += "; fp16"
    try:
        onnx.checker.check_model(half, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise InternalError(f"the fp16 model fails onnx.checker: {exc}") from exc
    tolerance = config.fp16_tolerance or FP16_TOLERANCE
    section = {"precision": "fp16", **facts, "io_types": "float32", "tolerance": tolerance, "agreement": None}
    if not config.verify:
        section.update(verified=False, note="converted without checking (--no-verify)")
        return half, section
    if distilled is not None and distilled.get("kept"):
        reference, against = with_input_shapes(pruned32, shapes), "the distilled fp32 model"
    else:
        reference, against = masked_model(model, plan), "the masked fp32 model"
    progress.stage(f"verifying the fp16 model against {against} in ONNX Runtime")
    result = compare_models(reference, half, tolerance, config.seed, floors_of=model, which="the fp16 model")
    section.update(verified=True, reference=against, max_abs_diff=result.max_abs_diff,
                   max_rel_diff=result.max_rel_diff, passed=result.passed, batch=result.batch,
                   note="ONNX Runtime's CPU provider computes ops lacking fp16 kernels in fp32: this measures "
                        "the conversion and the weight rounding, not fp16 arithmetic (see precision.py)")
    if not result.passed:
        raise PassFailed(f"fp16 verification failed: the fp16 model differs from {against} by "
                         f"{result.max_rel_diff:.3g} (relative), tolerance {tolerance:g}")
    if feeds is not None:
        progress.stage("measuring fp16 top-1 agreement with the fp32 model on the calibration inputs")
        work = with_input_shapes(pruned32, shapes)
        batch, unit, usable = batch_size(work, feeds, [])
        stats = compare_first_output(first_output(work, usable, batch), first_output(half, usable, batch))
        section["agreement"] = stats["top1_agreement"]
        section["agreement_detail"] = {**stats, "samples": count(usable),
                                       "on": "all calibration inputs, fp16 vs the fp32 pruned model"}
        if calibration is not None:
            fit, held = split_holdout(usable, unit, config.calib_holdout_divisor)
            on = held if count(held) else fit
            calibration["fidelity"]["fp16"] = compare_first_output(first_output(dense, on, batch),
                                                                   first_output(half, on, batch))
    return half, section


def _verified(reference, rewritten, plan: Plan, config: PruneConfig, original, where: str = ""):
    """``verify`` -> its result, or ``PassFailed`` saying why (``where``: at which input sizes)."""
    result = verify(reference, rewritten, plan, tolerance=config.tolerance, seed=config.seed, original=original)
    if result.new_required_inputs:
        raise PassFailed(f"verification failed{where}: the rewritten model requires input(s) "
                         f"{', '.join(map(repr, result.new_required_inputs))} that the input model does not")
    if not result.passed:
        raise PassFailed(f"verification failed{where}: rewritten model differs from the masked original by "
                         f"{result.max_rel_diff:.3g} (relative), tolerance {result.tolerance:g}")
    return result


def _as_given(plan: Plan) -> Plan:
    """A given plan (``--plan-in`` or the Python API's ``config.plan``) as a new ``Plan`` whose
    layers say they were applied as saved, with what the saving run recorded (if any).

    Why new objects: the caller's plan is theirs (the Python API may apply one plan to several
    models); stamping its provenance in place would change it under them, and a second run
    would wrap "--plan-in (saved: --plan-in ...)" again."""
    if any(str((layer.provenance or {}).get("structure", "")).startswith(COUPLED_STRUCTURE) for layer in plan.layers):
        raise UserError("this plan comes from a --coupled-rate run, whose channel groups a plan does not record yet; "
                        "prune the model again with --coupled-rate instead of --plan-in")

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


def _couple(model: onnx.ModelProto, symbolic: onnx.ModelProto, config: PruneConfig, feeds: dict | None,
            progress: Progress):
    """Choose the coupled groups to narrow -> (CoupledPlan, model to plan the rest on, its config).

    ``symbolic``: ``model`` with the input's own dims, where the rewrite finds the groups again."""
    from .coupled import choose
    from .latency import profile
    from .macs import count_macs

    if config.plan is not None or config.groups != "auto" or config.tickets:
        raise UserError("--coupled-rate works with --groups auto only (not with --plan-in, --groups N or --tickets)")
    if config.target_speedup is not None:
        raise UserError("--coupled-rate does not take --target-speedup yet (its cost model does not see the coupled "
                        "cut); give --target-macs")
    progress.stage("narrowing coupled channel groups (residual streams, Concat/Split, SE gates)")
    coupled = choose(model, config.coupled_rate, profile(config.provider).align, config.exclude, feeds, [symbolic])
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
    readers = tuple(sorted(coupled.consumers))
    return coupled, coupled.narrowed, replace(config, exclude=tuple(config.exclude) + readers, fixed_channels=readers,
                                              g1_only=tuple(sorted(coupled.producers)), target_macs=target)


def _with_input_dims_of(model: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    restore_input_dims(copy, original)
    return copy


def _lap(timings: dict, name: str, since: float) -> float:
    now = time.perf_counter()
    timings[name] = now - since
    return now
