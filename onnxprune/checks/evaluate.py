"""Accuracy harness: top-1 of an ONNX classifier, and fidelity against a reference model.

Library use::

    from onnxprune.checks.eval_data import load_npz
    from onnxprune.checks.evaluate import evaluate
    report = evaluate("pruned.onnx", load_npz("test.npz"), reference="dense.onnx")
    report["top1"], report["reference"]["agreement"], report["reference"]["mean_kl"]

The command ``onnxprune eval`` (``commands/eval.py``) wraps it and knows the default data (the
Debian Fashion-MNIST test set, or the subset in a source checkout's ``samples/``); the library
takes data explicitly (``eval_data.py`` reads it), so it works the same from a wheel.

Inference uses onnxruntime's CPUExecutionProvider so results do not depend on a GPU.
No torch import here: torch is not a runtime dependency.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np

if TYPE_CHECKING:
    import onnx

from ..errors import UserError
from .class_scores import OutputKind, as_logits, class_axis, output_kind
from .eval_data import Dataset, as_dataset, load_npz  # noqa: F401  (load_npz: the library's reader, here too)

ModelLike = Union[str, Path, bytes, np.ndarray, "onnx.ModelProto"]  # noqa: F821


# ----------------------------------------------------------------------------- inference

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
              "tensor(double)": np.float64}


def _session(model: ModelLike):
    from .runtime import create_session

    if isinstance(model, (str, Path)):
        p = Path(model)
        if not p.is_file():
            raise UserError(f"model file not found: {p}")
        src, label = str(p), str(p)
    elif isinstance(model, bytes):
        src, label = model, "<model bytes>"
    elif hasattr(model, "SerializeToString"):
        src, label = model.SerializeToString(), "<ModelProto>"
    else:
        raise TypeError(f"model must be a path, bytes or onnx.ModelProto, not {type(model)}")
    return create_session(src, load_error=label.replace("{", "{{").replace("}", "}}")
                          + ": not a loadable ONNX model ({reason})")


def _first_output_kind(model: ModelLike, name: str) -> OutputKind:
    """What the graph says about the first output (a Softmax's axis); the graph is read without
    its weights."""
    import onnx

    try:
        if isinstance(model, (str, Path)):
            proto = onnx.load(str(model), load_external_data=False)
        elif isinstance(model, bytes):
            proto = onnx.load_from_string(model)
        else:
            proto = model
        return output_kind(proto, name)
    except Exception:  # ORT loaded it; a graph onnx cannot parse just has no Softmax to report
        return OutputKind()


def predict_logits(model: ModelLike, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Run ``model`` (path, bytes or ModelProto) on ``images`` with onnxruntime CPU.

    Uses the session's first input and first output; batches of ``batch_size`` (or the model's
    fixed batch size, if it has one). Returns the first output as float32 ``N x C`` logits
    (``class_scores.as_logits``: the log of a Softmax's probabilities).
    """
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    sess = _session(model)
    kind = _first_output_kind(model, sess.get_outputs()[0].name)
    inp = sess.get_inputs()[0]
    shape = list(inp.shape)
    if len(shape) != images.ndim:
        raise UserError(f"model input '{inp.name}' has rank {len(shape)} {shape}, but the data "
                        f"images have shape {tuple(images.shape)}")
    for axis, (want, got) in enumerate(zip(shape[1:], images.shape[1:]), start=1):
        if isinstance(want, int) and want > 0 and want != got:
            raise UserError(f"model input '{inp.name}' expects shape {shape}, but the data "
                            f"images have shape {tuple(images.shape)} (axis {axis})")
    if isinstance(shape[0], int) and shape[0] > 0:
        batch_size = shape[0]
    dtype = _ORT_TYPES.get(inp.type)
    if dtype is None:
        raise UserError(f"model input '{inp.name}' has type {inp.type}; expected a float tensor")
    outs = []
    n = len(images)
    for i in range(0, n, batch_size):
        xb = np.ascontiguousarray(images[i:i + batch_size], dtype=dtype)
        pad = 0
        if isinstance(shape[0], int) and shape[0] > 0 and len(xb) < shape[0]:
            pad = shape[0] - len(xb)  # fixed-batch model: pad the last batch
            xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], dtype=dtype)])
        try:
            y = sess.run(None, {inp.name: xb})[0]
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"inference failed on images of shape {tuple(xb.shape)}: {msg}") from None
        y = np.asarray(y)
        axis = class_axis(kind, y.shape)
        if (y.ndim < 2 or y.shape[0] != len(xb)
                or any(d != 1 for i, d in enumerate(y.shape[1:], start=1) if i != axis)):
            # a detector's map, a recogniser's N x T x C, a time-major output: no class per sample
            raise UserError(f"the model's first output has shape {list(y.shape)} for {len(xb)} images; "
                            f"accuracy and agreement need class scores, one row per image (N x classes)")
        if pad:
            y = y[:len(y) - pad]
        outs.append(as_logits(y, kind).reshape(len(y), -1).astype(np.float32))
    if not outs:
        raise UserError("no images to evaluate")
    return np.concatenate(outs)


# ----------------------------------------------------------------------------- metrics

def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())


def per_class_accuracy(logits: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    pred = logits.argmax(axis=1)
    return {int(c): float((pred[labels == c] == c).mean()) for c in np.unique(labels)}


def compare_logits(logits: np.ndarray, ref_logits: np.ndarray) -> dict:
    """Fidelity of ``logits`` to ``ref_logits``: top-1 agreement, mean KL(ref || model),
    max/mean abs logit difference."""
    if logits.shape != ref_logits.shape:
        raise UserError(f"model outputs shape {logits.shape} but the reference outputs "
                        f"{ref_logits.shape}")
    lp, lq = log_softmax(ref_logits), log_softmax(logits)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=1)
    diff = np.abs(logits.astype(np.float64) - ref_logits.astype(np.float64))
    return {
        "agreement": float((logits.argmax(1) == ref_logits.argmax(1)).mean()),
        "mean_kl": float(max(kl.mean(), 0.0)),
        "max_kl": float(max(kl.max(), 0.0)),
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
    }


def _logits_of(model, data: Dataset, batch_size: int) -> tuple[np.ndarray, str, float]:
    t0 = time.perf_counter()
    if isinstance(model, np.ndarray):
        logits, name = np.asarray(model, dtype=np.float32), "<logits>"
        if logits.ndim != 2 or len(logits) != len(data.labels):
            raise UserError(f"logits must be N x C with N = {len(data.labels)}, "
                            f"got {logits.shape}")
    else:
        logits = predict_logits(model, data.images, batch_size)
        name = str(model) if isinstance(model, (str, Path)) else f"<{type(model).__name__}>"
    return logits, name, time.perf_counter() - t0


def evaluate(model, data, reference=None, batch_size: int = 256, class_names=None) -> dict:
    """Top-1 accuracy of ``model`` on ``data``; with ``reference``, fidelity to it.

    ``model`` / ``reference``: ONNX path, bytes, ``onnx.ModelProto``, or precomputed logits
    (``np.ndarray`` N x C, as ``predict_logits`` returns them: the log of a Softmax model's
    probabilities, so compare a Softmax model with ``predict_logits`` output, not its raw one).
    ``data``: ``Dataset``, ``(images, labels)`` or an ``.npz`` path (``eval_data.as_dataset``).
    ``class_names``: the names of the classes in the per-class summary when there are that many
    (default ``class<i>``).

    Returns a JSON-serialisable dict::

        {"model", "data", "num_images", "top1", "correct", "seconds",
         "per_class": {"names", "accuracy" (list), "mean", "min", "min_class", "max", "max_class"},
         "reference": None | {"model", "top1", "agreement", "mean_kl", "max_kl",
                              "max_abs_logit_diff", "mean_abs_logit_diff"}}
    """
    ds = as_dataset(data)
    logits, name, secs = _logits_of(model, ds, batch_size)
    num_classes = logits.shape[1]
    if ds.labels.max() >= num_classes:
        raise UserError(f"model outputs {num_classes} values per image but labels go up to "
                        f"{int(ds.labels.max())}")
    names = list(class_names) if class_names is not None and len(class_names) == num_classes \
        else [f"class{i}" for i in range(num_classes)]
    pcs = per_class_accuracy(logits, ds.labels)
    present = sorted(pcs)
    accs = [pcs[c] for c in present]
    worst, best = present[int(np.argmin(accs))], present[int(np.argmax(accs))]
    report = {
        "model": name,
        "data": ds.description,
        "num_images": int(len(ds.labels)),
        "top1": top1_accuracy(logits, ds.labels),
        "correct": int((logits.argmax(1) == ds.labels).sum()),
        "seconds": round(secs, 3),
        "per_class": {
            "names": [names[c] for c in present],
            "accuracy": accs,
            "mean": float(np.mean(accs)),
            "min": pcs[worst], "min_class": names[worst],
            "max": pcs[best], "max_class": names[best],
        },
        "reference": None,
    }
    if reference is not None:
        ref_logits, ref_name, _ = _logits_of(reference, ds, batch_size)
        cmp = compare_logits(logits, ref_logits)
        report["reference"] = {"model": ref_name, "top1": top1_accuracy(ref_logits, ds.labels),
                               **cmp}
    return report
