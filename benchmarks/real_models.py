"""Export real-world CNNs with both PyTorch exporters and prune each with onnxprune.

Prints one table: model, exporter, Convs pruned/skipped, MACs before/after, verify diff and the
wall time of the prune. Needs `pip install torch==2.13.0 onnxscript` (not library deps).

    python benchmarks/real_models.py [--models resnet18 resnet50 mobilenet_v2] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from torch_models import BUILDERS, export, randomize_bn  # noqa: E402
from onnxprune.pipeline import PruneConfig, prune  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    parser.add_argument("--exporters", nargs="+", default=["torchscript", "dynamo"], choices=["torchscript", "dynamo"])
    parser.add_argument("--rate", type=float, default=0.4375)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--out", default=None, help="folder for the exported models (default: a temp dir)")
    args = parser.parse_args()
    torch.manual_seed(0)
    folder = Path(args.out or tempfile.mkdtemp(prefix="onnxprune_real_"))
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models:
        model = randomize_bn(BUILDERS[name]())
        for exporter in args.exporters:
            path = folder / f"{name}_{exporter}.onnx"
            export(model, str(path), dynamo=exporter == "dynamo")
            start = time.perf_counter()
            _, report = prune(str(path), PruneConfig(rate=args.rate, groups=args.groups))
            wall = time.perf_counter() - start
            rows.append((name, exporter, report["convs_pruned"], report["convs_skipped"], report["macs_before"],
                         report["macs_after"], report["verify"]["max_rel_diff"], wall))
            print(f"  done {name} ({exporter}) in {wall:.1f}s", file=sys.stderr, flush=True)
    print(f"\nrate {args.rate}, groups {args.groups}; MACs at batch 1, 224x224\n")
    print("| model | exporter | Convs pruned/skipped | MACs before | MACs after | cut | verify max rel diff | prune wall time |")
    print("|---|---|---|---|---|---|---|---|")
    for name, exporter, pruned, skipped, before, after, diff, wall in rows:
        print(f"| {name} | {exporter} | {pruned}/{skipped} | {before / 1e9:.3f} G | {after / 1e9:.3f} G | "
              f"{100 * (1 - after / before):.1f}% | {diff:.1e} | {wall:.1f} s |")


if __name__ == "__main__":
    main()
