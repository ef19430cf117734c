"""Label-free distillation: fine-tune a pruned model's weights so its logits match the dense model's.

After pruning and the least-squares refit, the pruned model (the *student*) is trained on the
unlabelled calibration images to reproduce the dense model's (the *teacher's*) output, with the
graph fixed: only the float initializers read as Conv weights/biases and Gemm B/C change, the
nodes, names, shapes and dtypes stay as they are.

How, and why:
- the student runs in PyTorch through ``torch_bridge.OnnxModule`` (the graph interpreted op by
  op, each trainable initializer one ``nn.Parameter`` under its ONNX name); the teacher runs in
  ONNX Runtime (inference only, no gradient needed), once per augmented batch;
- before training the bridge is checked against ONNX Runtime on the student (1e-3 relative), and
  after training the written-back model is checked against the bridge, so what was trained is
  what is shipped (``report["export_max_rel_diff"]``);
- augmentation (per sample, from a numpy generator seeded by ``seed``): a random zoom (crop or
  pad, side scale in ``zoom``), a random shift of up to ``max_shift`` of the side beyond the
  crop's slack, a horizontal flip with probability 1/2; one bilinear ``grid_sample`` with
  reflection padding; applied to every 4-D float input alike (batches and augmentation:
  ``distill_data.py``);
- loss: KL(teacher || student) on softmax(logits / temperature) x temperature² (``loss="kl"``),
  or mean squared logit error (``loss="mse"``), on the first graph output, over its class axis
  (the loss and the reported agreement measures: ``distill_metrics.py``; an output without class
  scores trains on its relative squared error, ``report["loss_used"]``), plus, with ``hints``,
  the intermediate tensors' relative squared error (``hints.py``);
- Adam with a short linear warm-up (5% of the steps) then cosine decay to zero, fp32;
- a fraction ``holdout`` of the images (chosen by ``seed``) is never trained on (or the separate
  ``eval_images``); KL and top-1 agreement with the teacher are measured on (at most
  ``eval_limit`` of) them and on the first ``eval_limit`` training images, unaugmented, in ONNX
  Runtime before and after;
- the number of steps is either given (``steps=``) or derived from ``time_budget_s``: the time
  of one training step is probed (on its own random stream, without updating any weight) and
  the steps that fit in what is left of the budget are run. The budget covers the probe and the
  training steps; loading, the bridge check and the before/after evaluations (``eval_limit``
  images each) come on top and are reported as ``eval_s``. The report records ``steps``; the
  same inputs, seed, ``steps``, library versions and torch thread count give byte-identical
  initializers. If a budgeted run becomes much slower than probed (over 1.25 x budget + 10 s),
  training stops early and the report says ``truncated`` (that result is not reproducible by
  ``steps=``).
"""

from __future__ import annotations

import math
import time

import numpy as np
import onnx

from .distill_data import Batches, augment, load_images
from .hints import HINT_KINDS, candidates, hint_loss, with_outputs
from .distill_metrics import (EVAL_BATCH, agreement, distill_loss, logits, loss_curve, loss_used, lower_is_better,
                              rel_diff)
from ..checks.class_scores import output_kind
from ..errors import InternalError
from ..ir.shapes import fixed_batch
from .torch_bridge import OnnxModule, UnsupportedModel, default_trainable, require_torch

__all__ = ["distill", "structure_problems", "UnsupportedModel"]


def distill(student, teacher, images, *, time_budget_s: float | None = None, steps: int | None = None,
            seed: int = 0, lr: float = 1e-5, batch_size: int = 32, optimizer: str = "adam",
            loss: str = "kl", temperature: float = 1.0, zoom: tuple[float, float] = (0.8, 1.05),
            max_shift: float = 0.1, flip: bool = True, augment_prob: float = 0.5, holdout: float = 0.2,
            hints: str = "none", hint_weight: float = 1.0, eval_images=None, eval_limit: int = 512,
            trainable: list | None = None, threads: int | None = None,
            progress=None) -> tuple[onnx.ModelProto, dict]:
    """Fine-tune ``student``'s weights towards ``teacher``'s outputs -> ``(student', report)``.

    ``student``/``teacher``: ModelProto or path; same inputs and first-output shape. ``images``:
    ``{input name: array}``, one array (single-input model) or a calibration path, as for
    ``--calib`` (uint8 is scaled to [0, 1]). Exactly one of ``time_budget_s`` (seconds for the
    probe and the training steps) and ``steps`` must be given; ``report["options"]`` plus
    ``steps=report["steps"]`` reproduce a run.
    ``optimizer``: ``"adam"`` or ``"sgd"`` (momentum 0.9, Nesterov). ``augment_prob``: chance
    that a sample is augmented (the others are used as they are); for data whose orientation or
    framing carries meaning (Fashion-MNIST: centred items, shoes facing left) use ``flip=False``
    and a small ``max_shift``, or ``augment_prob=0``.
    ``eval_images``: held-out images given separately (same forms as ``images``), e.g. crops of
    other photographs; then all of ``images`` are trained on and ``holdout`` is ignored.
    ``trainable``: initializer names to train (default: Conv/Gemm weights and biases).
    ``hints``: ``"none"`` (default), ``"pool"`` or ``"stream"``: intermediate tensors the student
    also mimics (``hints.py``), their mean relative squared error x ``hint_weight`` added to the
    loss; an experiment's knob (not a CLI option: on MobileNetV2 it did not generalise better,
    benchmarks/README.md "Distilling with feature hints").
    ``threads``: torch intra-op threads for this call (restored afterwards; default: unchanged;
    1 is much faster than 2 on a CPU that other processes keep busy).
    ``progress``: an object with ``stage(msg)`` / ``layer(done, total, name)`` (as
    ``pipeline.Progress``) or a callable ``(step, steps, loss)``.
    Raises ``UnsupportedModel`` when the student graph cannot run in the torch bridge,
    ``ImportError`` when torch is missing, ``ValueError`` for bad options.
    """
    options = dict(locals())
    torch = require_torch()
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _distill(**options)
    finally:
        torch.set_num_threads(saved_threads)


def _distill(student, teacher, images, *, time_budget_s, steps, seed, lr, batch_size, optimizer, loss,
             temperature, zoom, max_shift, flip, augment_prob, holdout, hints, hint_weight, eval_images, eval_limit,
             trainable, threads, progress):
    import torch

    recorded = {"seed": seed, "lr": lr, "batch_size": batch_size, "optimizer": optimizer, "loss": loss,
                "temperature": temperature, "zoom": list(zoom), "max_shift": max_shift, "flip": flip,
                "augment_prob": augment_prob, "holdout": holdout, "eval_limit": eval_limit, "hints": hints,
                "hint_weight": hint_weight}
    from ..ir.model_io import load_model

    started = time.perf_counter()
    if (time_budget_s is None) == (steps is None):
        raise ValueError("give exactly one of time_budget_s and steps")
    if steps is not None and steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    if loss not in ("kl", "mse"):
        raise ValueError(f"loss must be 'kl' or 'mse', got {loss!r}")
    if hints not in HINT_KINDS:
        raise ValueError(f"hints must be one of {', '.join(HINT_KINDS)}, got {hints!r}")
    if batch_size < 1 or eval_limit < 1:
        raise ValueError("batch_size and eval_limit must be >= 1")
    student = student if isinstance(student, onnx.ModelProto) else load_model(student)
    teacher = teacher if isinstance(teacher, onnx.ModelProto) else load_model(teacher)
    fixed = fixed_batch(student)
    if fixed is not None:
        raise UnsupportedModel(f"the model's batch size is fixed at {fixed}; distillation feeds batches of "
                               f"other sizes (training {batch_size}, measuring up to {EVAL_BATCH})")
    say = _Say(progress)

    feeds = load_images(images, student)
    input_names = list(feeds)
    count = len(feeds[input_names[0]])
    rng = np.random.default_rng(seed)
    order = rng.permutation(count)
    if eval_images is not None:
        hold, n_hold, train_idx = load_images(eval_images, student), None, np.arange(count)
        n_hold = len(hold[input_names[0]])
    else:
        n_hold = min(count - 1, max(1, int(round(holdout * count)))) if holdout > 0 and count >= 2 else 0
        hold_idx, train_idx = np.sort(order[:n_hold]), np.sort(order[n_hold:])
        hold = {k: v[hold_idx] for k, v in feeds.items()}
    train = {k: v[train_idx] for k, v in feeds.items()}
    train_eval = {k: v[:eval_limit] for k, v in train.items()}
    hold = {k: v[:eval_limit] for k, v in hold.items()}
    n_hold = len(hold[input_names[0]])

    say.stage("distillation: building the torch student and checking it against ONNX Runtime")
    module = OnnxModule(student, trainable if trainable is not None else default_trainable(student))
    teacher_sess, student_sess = _session(teacher, threads), _session(student, threads)
    teacher_inputs = sorted(i.name for i in teacher_sess.get_inputs())
    if teacher_inputs != sorted(input_names):
        raise ValueError(f"teacher inputs {teacher_inputs} differ from the student's {sorted(input_names)}")

    t_eval = time.perf_counter()
    t_hold = logits(teacher_sess, hold)
    t_train = logits(teacher_sess, train_eval)
    before_hold = logits(student_sess, hold)
    before_train = logits(student_sess, train_eval)
    eval_s = time.perf_counter() - t_eval
    if t_hold.shape[1:] != before_hold.shape[1:] or t_train.shape[1:] != before_train.shape[1:]:
        raise ValueError(f"teacher output shape {t_train.shape[1:]} differs from the student's "
                         f"{before_train.shape[1:]}")
    check = {k: v[:4] for k, v in (hold if n_hold else train).items()}
    with torch.no_grad():
        bridged = module(*[torch.from_numpy(check[k]) for k in input_names])[0].numpy()
    bridge_diff = rel_diff((before_hold if n_hold else before_train)[:4], bridged)
    if not bridge_diff <= 1e-3:
        raise UnsupportedModel(f"the torch bridge differs from ONNX Runtime by {bridge_diff:.3g} (relative)")
    hint_names = _matching_hints(module, teacher, student, hints, check, input_names, threads)
    target_sess = _session(with_outputs(teacher, hint_names), threads) if hint_names else teacher_sess
    target_names = [teacher_sess.get_outputs()[0].name, *hint_names]
    classes = output_kind(teacher, target_names[0])

    params = [module.parameter(name) for name in module.trainable_names]
    opt = torch.optim.Adam(params, lr=lr) if optimizer == "adam" else \
        torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)
    sampler = Batches(len(train_idx), batch_size, rng)
    train_t = {k: torch.from_numpy(v) for k, v in train.items()}

    def step_loss(step_rng, index):
        batch = {k: v[index] for k, v in train_t.items()}
        batch = augment(batch, step_rng, zoom, max_shift, flip, augment_prob)
        # float32 targets: an fp16 teacher's mean square overflows past |x| ~ 256
        targets = [torch.from_numpy(t.astype(np.float32, copy=False)) for t in
                   target_sess.run(target_names, {k: v.numpy() for k, v in batch.items()})]
        output, *values = module(*[batch[k] for k in input_names], extra=tuple(hint_names))
        value = distill_loss(output, targets[0], loss, temperature, classes)
        if hint_names:
            value = value + hint_weight * hint_loss(values, targets[1:])
        return value

    probe_s = None
    budget_started = time.perf_counter()
    if steps is None:
        say.stage("distillation: timing one training step")
        probe_rng = np.random.default_rng([seed, 1])
        times = []
        for _ in range(3):
            t = time.perf_counter()
            index = probe_rng.choice(len(train_idx), size=min(batch_size, len(train_idx)), replace=False)
            value = step_loss(probe_rng, torch.from_numpy(np.sort(index)))
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
        probe_s = float(np.median(times[1:])) * 1.03 + 0.002  # optimizer update and bookkeeping
        left = time_budget_s - (time.perf_counter() - budget_started)
        steps = max(0, int(left // probe_s))

    say.stage(f"distillation: {steps} steps of batch {batch_size} on {len(train_idx)} images "
              f"({n_hold} held out)")
    warmup = max(1, steps // 20)
    losses, truncated, diverged, done = [], False, False, 0
    deadline = None if time_budget_s is None else budget_started + 1.25 * time_budget_s + 10.0
    t_train_start = time.perf_counter()
    for step in range(steps):
        scale = (step + 1) / warmup if step < warmup else \
            0.5 * (1.0 + math.cos(math.pi * (step - warmup + 1) / max(1, steps - warmup + 1)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        value = step_loss(rng, sampler.next())
        if not torch.isfinite(value):
            diverged = True
            break
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        losses.append(float(value.detach()))
        done = step + 1
        say.step(done, steps, losses[-1])
        if deadline is not None and time.perf_counter() > deadline and done < steps:
            truncated = True
            break
    train_s = time.perf_counter() - t_train_start
    budget_s = time.perf_counter() - budget_started
    t_eval = time.perf_counter()

    say.stage("distillation: writing the weights back and measuring agreement with the teacher")
    if diverged:  # the weights may hold NaNs: return the student unchanged
        module, done = OnnxModule(student, module.trainable_names), 0
    distilled = module.export() if done else _copy(student)
    after_sess = _session(distilled, threads)
    after_hold = logits(after_sess, hold)
    after_train = logits(after_sess, train_eval)
    with torch.no_grad():
        bridged = module(*[torch.from_numpy(check[k]) for k in input_names])[0].numpy()
    export_diff = rel_diff((after_hold if n_hold else after_train)[:4], bridged)
    if not export_diff <= 1e-3:
        raise InternalError(f"the distilled ONNX model differs from the trained torch module "
                           f"by {export_diff:.3g} (relative)")

    report = {
        "steps": steps, "steps_done": done, "truncated": truncated, "diverged": diverged,
        "epochs": round(done * min(batch_size, len(train_idx)) / max(1, len(train_idx)), 3),
        "options": recorded, "time_budget_s": time_budget_s,
        "probe_step_s": None if probe_s is None else round(probe_s, 4),
        "train_s": round(train_s, 3), "probe_and_train_s": round(budget_s, 3),
        "eval_s": round(eval_s + time.perf_counter() - t_eval, 3),
        "wall_s": round(time.perf_counter() - started, 3),
        "torch_threads": torch.get_num_threads(),
        "images": {"train": int(len(train_idx)), "holdout": int(n_hold), "train_eval": len(t_train)},
        "hints": hint_names,
        "trainable_tensors": len(params), "trainable_values": int(sum(p.numel() for p in params)),
        "bridge_max_rel_diff": float(bridge_diff), "export_max_rel_diff": float(export_diff),
        "loss_curve": loss_curve(losses),
        "loss_used": loss_used(loss, classes, t_train.shape),
        "holdout": {"before": agreement(t_hold, before_hold, temperature, classes),
                    "after": agreement(t_hold, after_hold, temperature, classes)} if n_hold else None,
        "train": {"before": agreement(t_train, before_train, temperature, classes),
                  "after": agreement(t_train, after_train, temperature, classes)},
    }
    report["improved"] = (lower_is_better(report["holdout"]["after"]) < lower_is_better(report["holdout"]["before"])
                          if n_hold else None)
    return distilled, report


def structure_problems(before: onnx.ModelProto, after: onnx.ModelProto,
                       trainable: list[str] | None = None) -> list[str]:
    """What differs between two models beyond the values of ``trainable`` initializers (empty: none).

    Compares opsets, graph inputs/outputs, every node (serialized), and every initializer's name,
    dtype and dims in order; values may differ only for ``trainable`` (default: Conv/Gemm
    weights and biases of ``before``).
    """
    problems = []
    allowed = set(default_trainable(before) if trainable is None else trainable)
    if list(before.opset_import) != list(after.opset_import):
        problems.append("opset imports differ")
    for what in ("input", "output", "node"):
        a, b = getattr(before.graph, what), getattr(after.graph, what)
        if len(a) != len(b):
            problems.append(f"{len(a)} graph {what}s before, {len(b)} after")
            continue
        for i, (x, y) in enumerate(zip(a, b)):
            if x.SerializeToString(deterministic=True) != y.SerializeToString(deterministic=True):
                problems.append(f"graph {what} #{i} ({x.name!r}) differs")
    a, b = before.graph.initializer, after.graph.initializer
    if [t.name for t in a] != [t.name for t in b]:
        problems.append("initializer names or order differ")
    else:
        for x, y in zip(a, b):
            if x.data_type != y.data_type or list(x.dims) != list(y.dims):
                problems.append(f"initializer {x.name!r}: dtype/shape {x.data_type}{list(x.dims)} -> "
                                f"{y.data_type}{list(y.dims)}")
            elif x.name not in allowed and not np.array_equal(onnx.numpy_helper.to_array(x),
                                                              onnx.numpy_helper.to_array(y)):
                problems.append(f"initializer {x.name!r} is not trainable but its value changed")
    return problems


# -- helpers ------------------------------------------------------------------------------

class _Say:
    def __init__(self, progress):
        self.progress = progress

    def stage(self, message):
        if hasattr(self.progress, "stage"):
            self.progress.stage(message)

    def step(self, done, total, value):
        if hasattr(self.progress, "layer"):
            self.progress.layer(done, total, f"distill loss {value:.4g}")
        elif callable(self.progress):
            self.progress(done, total, value)



def _matching_hints(module, teacher, student, kind, check, input_names, threads) -> list[str]:
    """The hint candidates whose student and teacher values have the same shape on ``check``."""
    import torch

    names = candidates(student, teacher, kind)
    if not names:
        return []
    sess = _session(with_outputs(teacher, names), threads)
    wanted = [o.name for o in sess.get_outputs()][:1] + names
    expected = sess.run(wanted, {k: v for k, v in check.items()})[1:]
    with torch.no_grad():
        got = module(*[torch.from_numpy(check[k]) for k in input_names], extra=tuple(names))[1:]
    # float tensors only (an integer Add is no feature map); shapes must match channel by channel
    return [name for name, a, b in zip(names, expected, got)
            if np.issubdtype(a.dtype, np.floating) and tuple(a.shape) == tuple(b.shape)]


def _session(model, threads=None):
    from ..checks.runtime import create_session

    return create_session(model, threads=threads, load_error=None)  # our own models: a failure is a bug


def _copy(model):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out
