"""Fit the ORT cost model's coefficients to whole-model latencies (``onnxprune/planning/cost_fit.py``).

Three steps, each a subcommand:

    # 1. pruned variants of a dense model, planned under randomly perturbed per-class costs so
    #    that they cut different kinds of Convs (1×1, k×k, depthwise, streams) by different amounts
    python benchmarks/fit_cost_model.py variants DENSE.onnx OUTDIR [--n 8]
    # 2. time the dense model and its variants side by side (interleaved medians), batch 1 and 8;
    #    each sample is stored with its Convs' shapes
    python benchmarks/fit_cost_model.py measure FAMILY DENSE.onnx VARIANT.onnx ... --out S.json
    # 3. fit on every family, validate leaving each family out, print the coefficients
    python benchmarks/fit_cost_model.py fit S.json ...

Any pruned variants will do for step 2: what a sample records is its Convs' shapes and its
median latency. The CPU samples in ``benchmarks/results/cost_fit/`` (ORT CPU, 2 threads, this
project's machine) are 8 variants from step 1 per network (made by a prototype of it with other
base costs) plus the default, Torch-Pruning and other plans at ≈0.58 and ≈0.40 of the MACs;
``tests/test_cost_fit.py`` fits and validates them. Findings: benchmarks/README.md, "A cost
model fitted to whole-model latencies".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxprune.planning import cost_fit  # noqa: E402
from onnxprune.planning.cost_fit import FEATURES  # noqa: E402

TARGETS = (0.8, 0.65, 0.5, 0.4)
BASE_COSTS = {"macs_1x1": 1.5e-5, "macs_kxk": 1.3e-5, "macs_unaligned": 3e-5, "macs_depthwise": 7e-5,
              "macs_grouped": 1.5e-5, "output_elements": 3e-4}  # rough in-graph µs per unit

def variants(args) -> None:
    """Plans of ``args.dense`` under random per-class costs (seeded: the same files every run)."""
    import importlib

    from onnxprune.cli import main

    planners = [importlib.import_module(f"onnxprune.planning.{name}") for name in ("fidelity_plan", "speed_plan")]

    base = np.array([BASE_COSTS[name] for name in FEATURES])
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    original = [planner.load_cost_model for planner in planners]
    failed = 0
    try:
        for i in range(args.n):
            rng = np.random.default_rng(1000 + i)
            scale = np.exp(rng.uniform(np.log(0.2), np.log(5.0), size=base.size))
            model = cost_fit.FittedModel("cpu", base * scale)
            for planner in planners:  # the planners' only way to the cost model
                planner.load_cost_model = lambda provider="cpu", table_path=None, model=model: model
            target = TARGETS[i % len(TARGETS)]
            path = out / f"rand{i}_{target}.onnx"
            rc = main([args.dense, str(path), "--target-macs", str(target), "--quiet"])
            print(f"{path}: exit {rc}", flush=True)
            failed += rc != 0
    finally:
        for planner, load in zip(planners, original):
            planner.load_cost_model = load
    if failed:
        sys.exit(f"{failed} of {args.n} variants failed")


def measure(args) -> None:
    """Time the dense model (first) and its variants side by side; record each with its Convs."""
    from onnxprune.checks.bench import Settings, compare

    paths = [args.dense, *args.variants]
    models = [onnx.load(p) for p in paths]
    report = compare(models, paths, args.batch, Settings(provider=args.provider, threads=args.threads),
                     repeat=args.repeat)
    samples = []
    for result in report["results"]:
        for i, (path, model, row) in enumerate(zip(paths, models, result["rows"])):
            ops = cost_fit.model_conv_ops(model, row["batch"])  # a fixed-batch model runs at its own
            samples.append({"provider": args.provider, "family": args.family, "batch": row["batch"], "label": path,
                            "dense": i == 0, "median_ms": row["median_ms"], "ops": [op.key for op in ops]})
            print(f"{args.family} b{row['batch']} {path}: {row['median_ms']:.3f} ms "
                  f"({row['speedup_vs_first']:.2f}x)")
    data = {"settings": report["settings"], "repeat": args.repeat, "samples": samples}
    Path(args.out).write_text(json.dumps(data, indent=1) + "\n")


def fit(args) -> None:
    samples, provider = cost_fit.load_samples(args.samples)
    result = cost_fit.fit(samples, provider)
    print("coefficients (µs per unit):")
    for name, value in zip(FEATURES, result.coefficients):
        print(f"  {name:16s} {value:.4g}")
    print("leave one network out (speedup over dense: median |error| / Spearman):")
    for key, row in cost_fit.validate(samples, provider).items():
        cells = "   ".join(f"{name} {row[name]['median_abs_speedup_error']:.3f} / {row[name]['spearman']:.2f}"
                           for name in ("fitted", "analytical", "planner"))
        print(f"  {key:24s} {row['variants']:2d} variants  {cells}")


def batches(text: str) -> list[int]:
    """``onnxprune bench``'s --batch rule, as an argparse type."""
    from onnxprune.commands.bench import parse_batches
    from onnxprune.errors import UserError

    try:
        return parse_batches(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("variants")
    p.add_argument("dense")
    p.add_argument("outdir")
    p.add_argument("--n", type=int, default=8)
    p.set_defaults(run=variants)
    p = sub.add_parser("measure")
    p.add_argument("family")
    p.add_argument("dense")
    p.add_argument("variants", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=batches, default=[1, 8], help="comma-separated batch sizes")
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: IOBinding timing as onnxprune bench does (the samples record it)")
    p.set_defaults(run=measure)
    p = sub.add_parser("fit")
    p.add_argument("samples", nargs="+")
    p.set_defaults(run=fit)
    args = parser.parse_args()
    try:
        args.run(args)
    except ValueError as exc:  # the library's one-line reasons (too few networks, mixed providers)
        sys.exit(f"fit_cost_model.py {args.command}: {exc}")


if __name__ == "__main__":
    main()
