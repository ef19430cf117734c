#!/usr/bin/env python
"""Where the calibration refit stops generalising: one fixed plan, refit variants, fit vs held-out.

The pipeline's refit (``onnxprune.calibration.calibrate``) is run in-process on a saved plan (``--plan-out``
of a pruning run), so only the refit changes between variants, and the calibrated masked model
(which computes exactly what the rewritten model computes) is compared with the dense model:

- ``variants``: top-1 agreement and mean KL on the evaluation photos and on the calibration
  inputs, for refit options given as JSON objects of calibrate's config fields (``calib_ridge``,
  ``calib_layers``, ``calib_target``), ``"calib_size": N`` and ``"augment": "zoom"`` (each
  calibration image also as its central 3/4 scaled back up);
- ``--per-layer``: the relative error of every Conv/Gemm output against the dense model on the
  fit inputs, the refit's own held-out slice and the evaluation photos — where the gap opens.

Needs samples/generated/{MODEL}.onnx and photos_{calib,eval}.npz (samples/make_imagenet_samples.py,
benchmarks/photos.py). Example (MobileNetV2 at 0.70 MACs)::

    onnxprune samples/generated/mobilenet_v2.onnx /tmp/mb.onnx --target-macs 0.7 \\
        --calib samples/generated/photos_calib.npz --calib-size 512 --plan-out /tmp/mb.plan.json
    python benchmarks/refit_limits.py samples/generated/mobilenet_v2.onnx /tmp/mb.plan.json \\
        --variants '{}' '{"calib_layers": "pruned"}' '{"calib_size": 256}' --per-layer
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxprune.calibration import calibrate as C  # noqa: E402
from onnxprune.calibration.calib_stream import HOLDOUT_DIVISOR  # noqa: E402
from onnxprune.checks.evaluate import compare_logits  # noqa: E402
from onnxprune.ir.model_io import load_model  # noqa: E402
from onnxprune.ir.normalize import normalize  # noqa: E402
from onnxprune.planning.plan import Plan  # noqa: E402

PHOTOS = ROOT / "samples" / "generated"


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _scaled(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / 255.0


def logits(model: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    s = _session(model)
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: _scaled(images[i:i + 64])})[0] for i in range(0, len(images), 64)])


def zoomed(images: np.ndarray, keep: float = 0.75) -> np.ndarray:
    """Each image's central ``keep`` fraction scaled back to full size (bilinear): another view of
    the same photo, not another photo."""
    from scipy.ndimage import zoom

    n, c, h, w = images.shape
    top, left = int(round(h * (1 - keep) / 2)), int(round(w * (1 - keep) / 2))
    crop = images[:, :, top:h - top, left:w - left].astype(np.float32)
    out = zoom(crop, (1, 1, h / crop.shape[2], w / crop.shape[3]), order=1)
    return np.clip(np.rint(out), 0, 255).astype(images.dtype)


def refit(model, plan_text: str, calib: np.ndarray, options: dict):
    options = dict(options)
    n = int(options.pop("calib_size", len(calib)))
    data = calib[:n]
    if options.pop("augment", None) == "zoom":  # interleaved, so the held-out slice holds whole pairs
        data = np.stack([data, zoomed(data)], axis=1).reshape(2 * n, *data.shape[1:])
    config = SimpleNamespace(calib={"input": data}, calib_size=len(data), calib_selection="weights", **options)
    return C.calibrate(model, Plan.from_json(plan_text), config)  # calib_selection="weights": plan unchanged


def per_layer_errors(dense, work, images: np.ndarray) -> dict[str, float]:
    """Relative squared error of every Conv/Gemm output (shapes equal in the masked model)."""
    names = [n.output[0] for n in dense.graph.node if n.op_type in ("Conv", "Gemm")]
    sessions = []
    for m in (dense, work):
        m = copy.deepcopy(m)
        have = {o.name for o in m.graph.output}
        m.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                              for n in names if n not in have)
        sessions.append(_session(m))
    num = dict.fromkeys(names, 0.0)
    den = dict.fromkeys(names, 0.0)
    for b in range(0, len(images), 32):
        outs = []
        for s in sessions:
            values = s.run(None, {s.get_inputs()[0].name: _scaled(images[b:b + 32])})
            outs.append(dict(zip([o.name for o in s.get_outputs()], values)))
        for n in names:
            a, c = outs[0][n], outs[1][n]
            axes = (0, 2, 3) if a.ndim == 4 else 0
            num[n] += float(((a - c) ** 2).sum())
            den[n] += float(((a - a.mean(axes, keepdims=True)) ** 2).sum())
    return {n: num[n] / max(den[n], 1e-30) for n in names}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("plan")
    p.add_argument("--variants", nargs="*", default=["{}"], help="JSON objects of refit options")
    p.add_argument("--per-layer", action="store_true", help="per-layer errors of the first variant")
    p.add_argument("--calib-size", type=int, default=512)
    args = p.parse_args()
    model = normalize(load_model(args.model))
    plan_text = Path(args.plan).read_text()
    calib = np.load(PHOTOS / "photos_calib.npz")["input"]
    evaluation = np.load(PHOTOS / "photos_eval.npz")["input"]
    dense_eval = logits(model, evaluation)
    print("| refit options | eval agreement | eval KL | calib agreement | calib KL | refit s |")
    print("|---|---|---|---|---|---|")
    first = None
    for text in args.variants:
        options = {"calib_size": args.calib_size, **json.loads(text)}
        started = time.perf_counter()
        work = refit(model, plan_text, calib, options).model
        wall = time.perf_counter() - started
        first = first or (work, options)
        used = calib[:options["calib_size"]]
        e = compare_logits(logits(work, evaluation), dense_eval)
        c = compare_logits(logits(work, used), logits(model, used))
        print(f"| `{json.dumps(options)}` | {e['agreement']:.3f} | {e['mean_kl']:.3f} | {c['agreement']:.3f} | "
              f"{c['mean_kl']:.3f} | {wall:.0f} |", flush=True)
    if args.per_layer and first is not None:
        work, options = first
        used = calib[:options["calib_size"]]
        split = len(used) - len(used) // HOLDOUT_DIVISOR
        sets = {"fit": used[:split], "refit held-out": used[split:], "eval photos": evaluation[:192]}
        errors = {k: per_layer_errors(model, work, v) for k, v in sets.items()}
        print("\n| layer output | " + " | ".join(f"rel. error, {k}" for k in sets) + " |")
        print("|---|" + "---|" * len(sets))
        for name in errors["fit"]:
            print(f"| {name} | " + " | ".join(f"{errors[k][name]:.4f}" for k in sets) + " |")


if __name__ == "__main__":
    main()
