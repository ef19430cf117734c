#!/usr/bin/env python
"""How much top-1 agreement do *tiny* weight perturbations already cost on the evaluation photos?

Why: issue 13 asks for >= 95% top-1 agreement with the dense model at 0.85 of the MACs. Agreement
counts every flipped top-1, and on real photographs a pretrained MobileNetV2 / EfficientNet-Lite0
has many low-margin predictions, so it is far stricter than an accuracy delta. This script puts
the target on a scale: the dense (normalized, BN folded) model with every Conv/Gemm weight
- rounded to fp16 and back,
- rounded to 8 or 6 bits per output channel (symmetric, scale = max |w| / (2^(b-1) - 1): the
  weight-only quantization deployments apply),
- plus Gaussian noise of 1% of each tensor's standard deviation,
compared with the dense model on ``samples/generated/photos_eval.npz`` (``benchmarks/photos.py``),
the photos ``benchmarks/fidelity.py`` uses. Prints a markdown table.

    python benchmarks/agreement_floor.py [--models mobilenet_v2 efficientnet_lite0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from fidelity import CONFIDENT, fidelity_metrics  # noqa: E402
from onnxprune.ir.model_io import load_model  # noqa: E402
from onnxprune.ir.normalize import normalize  # noqa: E402
from onnxprune.checks.runtime import create_session  # noqa: E402

GENERATED = ROOT / "samples" / "generated"


def logits(model: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    sess = create_session(model)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: images[i:i + 64]})[0] for i in range(0, len(images), 64)])


def per_channel_rounding(bits: int):
    def rounded(w: np.ndarray) -> np.ndarray:
        scale = np.abs(w.reshape(w.shape[0], -1)).max(1).reshape((-1,) + (1,) * (w.ndim - 1)) / (2 ** (bits - 1) - 1)
        scale = np.where(scale == 0, 1, scale)
        return np.round(w / scale) * scale
    return rounded


def with_weights(model: onnx.ModelProto, change) -> onnx.ModelProto:
    weights = {n.input[1] for n in model.graph.node if n.op_type in ("Conv", "Gemm")}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for tensor in out.graph.initializer:
        if tensor.name in weights:
            w = numpy_helper.to_array(tensor)
            tensor.CopyFrom(numpy_helper.from_array(change(w).astype(w.dtype), tensor.name))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mobilenet_v2", "efficientnet_lite0"])
    args = p.parse_args()
    images = np.load(GENERATED / "photos_eval.npz")["input"].astype(np.float32) / 255.0
    print(f"| model | weights | top-1 agreement | agreement where dense p(top-1) >= {CONFIDENT} | mean KL |\n"
          "|---|---|---|---|---|")
    for name in args.models:
        dense = normalize(load_model(GENERATED / f"{name}.onnx"))
        reference = logits(dense, images)
        rng = np.random.default_rng(0)
        variants = [("fp16", lambda w: w.astype(np.float16).astype(np.float32)),
                    ("int8 per output channel", per_channel_rounding(8)),
                    ("int6 per output channel", per_channel_rounding(6)),
                    ("+1% Gaussian noise", lambda w: w + 0.01 * w.std() * rng.standard_normal(w.shape))]
        for label, change in variants:
            m = fidelity_metrics(logits(with_weights(dense, change), images), reference)
            print(f"| {name} | {label} | {m['agreement']:.3f} | {m['agreement_confident']:.3f} "
                  f"({m['confident_samples']} crops) | {m['mean_kl']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
