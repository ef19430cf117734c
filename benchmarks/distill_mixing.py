"""Does mixing calibration images (mixup, CutMix) let ``--distill`` generalise? (issue 13)

    python benchmarks/distill_mixing.py STUDENT.onnx [--mode plain|mixup|cutmix] [--budget 300]

STUDENT: a pruned and calibrated MobileNetV2, e.g. ``onnxprune samples/generated/mobilenet_v2.onnx
S.onnx --target-macs 0.7 --calib samples/generated/photos_calib.npz --calib-size 512``. The
student is distilled towards the dense model on the first 512 calibration crops for ``--budget``
seconds (2 threads) and measured on the 384 evaluation crops (other photographs). ``mixup`` and
``cutmix`` run after the distiller's own zoom/shift/flip: each sample is mixed with another
sample of its batch (mixup: ``λx + (1-λ)x'``, λ ~ U(0, 1); CutMix: a random box of area
fraction ~ U(0, 1) pasted from ``x'``); the dense model labels the mixed image, so no label is
needed (the "function matching" of Beyer et al., 2022). Results: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxprune.distillation.distill as distill_module  # noqa: E402
from onnxprune.distillation.distill_data import augment as geometric  # noqa: E402


def mixing(mode: str):
    """The distiller's augmentation followed by ``mode`` mixing inside the batch."""
    import torch

    def augment(batch, rng, zoom, max_shift, flip, prob):
        out = geometric(batch, rng, zoom, max_shift, flip, prob)
        n = len(next(iter(out.values())))
        partner = rng.permutation(n)
        lam = rng.uniform(0.0, 1.0, n).astype(np.float32)
        mixed = {}
        for name, x in out.items():
            if x.dim() == 4 and x.is_floating_point():
                if mode == "mixup":
                    weight = torch.from_numpy(lam).view(n, 1, 1, 1)
                    x = weight * x + (1 - weight) * x[partner]
                else:
                    x = x.clone()
                    height, width = x.shape[2], x.shape[3]
                    for i in range(n):
                        side = np.sqrt(lam[i])
                        h, w = int(height * side), int(width * side)
                        y0, x0 = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
                        x[i, :, y0:y0 + h, x0:x0 + w] = out[name][partner[i], :, y0:y0 + h, x0:x0 + w]
            mixed[name] = x.contiguous()
        return mixed

    return augment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("student")
    parser.add_argument("--teacher", default=str(ROOT / "samples/generated/mobilenet_v2.onnx"))
    parser.add_argument("--calib", default=str(ROOT / "samples/generated/photos_calib.npz"))
    parser.add_argument("--eval", default=str(ROOT / "samples/generated/photos_eval.npz"))
    parser.add_argument("--mode", choices=("plain", "mixup", "cutmix"), default="plain")
    parser.add_argument("--budget", type=float, default=300.0)
    parser.add_argument("--hints", choices=("none", "pool", "stream"), default="none",
                        help="intermediate tensors the student also mimics (onnxprune.distillation.hints)")
    parser.add_argument("--hint-weight", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-5)
    args = parser.parse_args()
    if args.mode != "plain":
        distill_module.augment = mixing(args.mode)
    images = np.load(args.calib)["input"][:512]
    evaluation = np.load(args.eval)["input"]
    started = time.time()
    _, report = distill_module.distill(args.student, args.teacher, images, time_budget_s=args.budget,
                                       eval_images=evaluation, eval_limit=384, threads=2,
                                       hints=args.hints, hint_weight=args.hint_weight, lr=args.lr)
    print(json.dumps({"mode": args.mode, "hints": args.hints, "hint_weight": args.hint_weight, "lr": args.lr,
                      "hint_tensors": len(report["hints"]), "steps": report["steps"],
                      "wall_s": round(time.time() - started),
                      "evaluation": report["holdout"], "training": report["train"]}, indent=1))


if __name__ == "__main__":
    main()
