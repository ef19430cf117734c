"""The optional stages after verification: label-free distillation (``--distill``) and the fp16
conversion (``--precision fp16``), with the checks of their options that run before any work.

Why apart from ``pipeline``: both run on a model whose structure verification has already
proven, and each brings its own checks (distillation may change weight values only; fp16 is
verified against the fp32 oracle with a tolerance of its own); the pipeline only decides when.
"""

from __future__ import annotations

import onnx

from .errors import InternalError, PassFailed, UserError
from .planning.plan import Plan
from .ir.shapes import sizes_text, with_input_shapes


DISTILL_THREADS = 1  # torch threads for --distill: the step results depend on it (bytes), and one
# thread was ~10x faster than two on a loaded 2-core machine


def check_distill(config) -> None:
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


def distill_stage(pruned, original, feeds, config, progress):
    """Fine-tune the rewritten model's weights towards the original's outputs (structure fixed).

    Runs after verification: the exactness oracle has proven the *structure* (the rewrite equals
    the masked original), and distillation may then only change weight values — checked here
    with ``distill.structure_problems`` (same nodes, names, shapes, dtypes; only Conv/Gemm
    weights and biases differ)."""
    from .calibration.calib_stream import split_holdout
    from .distillation.distill import UnsupportedModel, distill, structure_problems

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


# fp16 verification tolerance, relative to each output's scale (as verify.py's 1e-4 is), against
# the reference with its weights rounded to fp16 (the rounding's own effect is reported, not judged:
# see precision.py): fp16's unit roundoff is 4.9e-4; on the CPU (fp16 stored between ops) the
# rest of the conversion moved ResNet-20 by 4e-4 and PP-OCRv4 rec's Softmax by 1.2e-2 (which
# fails), and on a GPU the activations are rounded at every layer (a few 1e-3 after ~20 layers).
# 1e-2 (~20 roundoffs) leaves that room, while a lost Cast, a wrong or corrupted weight or an
# overflow moves the output by 1e-1 or more.
FP16_TOLERANCE = 1e-2


def check_precision(config) -> None:
    """Option errors before any work."""
    if config.precision not in ("fp32", "fp16"):
        raise UserError(f"--precision must be 'fp32' or 'fp16', got {config.precision!r}")
    if config.fp16_tolerance is not None and not config.fp16_tolerance > 0:
        raise UserError(f"the fp16 tolerance must be positive, got {config.fp16_tolerance}")


def check_convertible(config, model) -> None:
    """With ``--precision fp16``, what the converter cannot take, refused once ``model`` is
    loaded and before any work."""
    if config.precision == "fp16":
        from .rewriting.precision import as_fp32, quantization_ops

        if as_fp32(model) is not None:
            raise UserError("--precision fp16: the model already holds float16 (an fp16 output pruned again keeps "
                            "its fp16): leave out --precision fp16")
        found = quantization_ops(model)
        if found:
            raise UserError(f"--precision fp16: the model is already quantized ({', '.join(found[:3])}); "
                            f"converting a quantized model to fp16 is not supported: leave out --precision fp16")


def fp16_stage(pruned32, model, dense, plan: Plan, distilled, feeds, calibration, config, shapes, progress,
               symbolic=None, also_verify=()):
    """The fp32 output converted to fp16 (``precision.py``) and checked -> (model, report section).

    The check (unless ``--no-verify``): seeded random inputs as for the fp32 verification, the
    fp16 model against the masked fp32 model (verification's own reference, so fp16 is judged
    against the oracle, not against the rewrite it came from), or, when distillation changed the
    weights, against the distilled fp32 model (its weights have no masked counterpart), either
    with its weights rounded to fp16 (``precision.fp16_rounded``), at ``FP16_TOLERANCE``; failing
    it fails the pass. What the rounding of the weights alone moves the output by is measured on
    the same inputs and reported (``weight_rounding_rel_diff``). With calibration inputs also the
    top-1 agreement of fp16 with the fp32 pruned model on all of them (no fitting involves the fp16
    rounding, so none need holding out; more inputs resolve it finer), and the fp16 model's
    fidelity to the input next to calibration's own (same held-out slice)."""
    from .calibration.calib_stream import batch_size, compare_first_output, count, first_output, split_holdout
    from .checks.runtime import ort_load_failure
    from .rewriting.precision import CRASH_FALLBACK_FP32, FP16_MAX, fp16_rounded, to_fp16
    from .checks.verify import compare_models, masked_model

    progress.stage("converting to fp16 (fp32 inputs and outputs; overflow-prone ops kept in fp32)")
    half, facts = to_fp16(pruned32)
    crash = ort_load_failure(half)
    if crash is not None and crash.startswith("signal"):  # ORT's own crash; one known way round it, then refuse
        progress.stage(f"ONNX Runtime fails loading the fp16 model ({crash}): converting again with "
                       f"{', '.join(CRASH_FALLBACK_FP32)} kept in fp32")
        half, facts = to_fp16(pruned32, also_fp32=CRASH_FALLBACK_FP32)
        again = ort_load_failure(half)
        if again is not None:
            raise PassFailed(f"fp16 conversion failed: ONNX Runtime fails loading the fp16 model ({again}, also with "
                             f"{', '.join(CRASH_FALLBACK_FP32)} kept in fp32); keep fp32 (leave out --precision fp16)")
        facts["ort_load_workaround"] = (f"ONNX Runtime failed loading the first fp16 conversion ({crash}); "
                                        f"{', '.join(CRASH_FALLBACK_FP32)} kept in fp32")
    elif crash is not None:
        raise InternalError(f"ONNX Runtime cannot load the fp16 model: {crash}")
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
    distilled_kept = distilled is not None and distilled.get("kept")
    against = ("the distilled fp32 model" if distilled_kept else "the masked fp32 model") + " with fp16-rounded weights"

    def checked(rounded, candidate, where: str = ""):  # ``rounded``: the reference, fp16_rounded
        result = compare_models(rounded, candidate, tolerance, config.seed, which="the fp16 model", fp16=True)
        if not result.passed:
            raise PassFailed(f"fp16 verification failed{where}: the fp16 model differs from {against} by "
                             f"{result.max_rel_diff:.3g} (relative), tolerance {tolerance:g}"
                             + (f"; {result.note}" if result.note else ""))
        return result

    progress.stage(f"verifying the fp16 model against {against} in ONNX Runtime")
    reference = with_input_shapes(pruned32, shapes) if distilled_kept else masked_model(model, plan)
    rounded, clamped = fp16_rounded(reference, half)
    result = checked(rounded, half)
    rounding = compare_models(reference, rounded, tolerance, config.seed)
    if clamped and not rounding.passed:  # the weights' own rounding is not judged, their overflow is
        raise PassFailed(f"fp16 conversion failed: {', '.join(clamped[:3])} holds values beyond float16's range "
                         f"(+-{FP16_MAX:g}), clamped they move the output by {rounding.max_rel_diff:.3g} (relative); "
                         f"keep fp32 (leave out --precision fp16)")
    section.update(verified=True, reference=against, max_abs_diff=result.max_abs_diff,
                   max_rel_diff=result.max_rel_diff, passed=result.passed, batch=result.batch,
                   weight_rounding_rel_diff=rounding.max_rel_diff, clamped_to_fp16_range=clamped,
                   judged=result.note,  # where a selection's picks were judged at their inputs, as verify does
                   note="ONNX Runtime's CPU provider computes ops lacking fp16 kernels in fp32: this measures "
                        "the conversion against fp16-rounded weights (their own effect: weight_rounding_rel_diff), "
                        "not fp16 arithmetic (see precision.py)")
    section["other_shapes"] = []
    if also_verify:  # further --input-shape sizes, as the fp32 verification does
        base, _ = fp16_rounded(pruned32 if distilled_kept else masked_model(symbolic, plan), half)  # input's dims
        for extra in also_verify:
            sizes = sizes_text(extra)
            progress.stage(f"verifying the fp16 model again at {sizes}")
            at = checked(with_input_shapes(base, extra), with_input_shapes(half, extra), f" at {sizes}")
            section["other_shapes"].append({"input_shapes": sizes, "max_rel_diff": at.max_rel_diff,
                                            "passed": at.passed})
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
