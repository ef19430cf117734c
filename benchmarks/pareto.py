#!/usr/bin/env python
"""Accuracy vs ONNX Runtime CPU latency on the wide sample model: onnxprune (with calibration)
at several rates, and the two peers (onnxsim Wanda + BN recovery, Torch-Pruning L1 + BN
recalibration) at the same MACs and calibration images. Writes a PNG and prints the table.

Latency: all models of the run are timed *interleaved* (one call of each per round, in a
rotating order, after warm-up), so background load on a shared machine hits every model
alike; the table reports medians and the ratio to the dense model's median. ORT CPU provider,
default threads, batch ``--batch``.

Model: samples/generated/wide_resnet.onnx or samples/wide*.onnx (a training snapshot if the
final export is missing, with a note). Requires matplotlib (benchmark-only dependency).

Example::

    python benchmarks/pareto.py --out benchmarks/pareto_wide.png
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import accuracy  # noqa: E402  (benchmarks/accuracy.py: peers and onnxprune runners)
from onnxprune.commands.eval import load_dataset  # noqa: E402  (the eval command's default data)
from onnxprune.checks.evaluate import evaluate  # noqa: E402
from onnxprune.ir.macs import count_macs  # noqa: E402
from onnxprune.ir.normalize import normalize  # noqa: E402

SAMPLES = HERE.parent / "samples"


def find_wide_model() -> tuple[Path, str]:
    finals = [p for pattern in ("generated/wide*.onnx", "wide*.onnx")
              for p in sorted(glob.glob(str(SAMPLES / pattern))) if "_snap_" not in p]
    if finals:
        return Path(finals[0]), ""
    snaps = sorted(glob.glob(str(SAMPLES / "generated/wide*_snap_*.onnx")) + glob.glob(str(SAMPLES / "wide*_snap_*.onnx")))
    if snaps:
        return Path(snaps[-1]), f"final wide model missing: used the training snapshot {Path(snaps[-1]).name}"
    raise SystemExit("no wide sample model (samples/generated/wide*.onnx); run samples/make_samples.py")


def interleaved_latency(models: dict, images: np.ndarray, rounds: int, warmup: int = 5) -> dict[str, float]:
    """Median seconds per call for each model, timed in rotating interleaved order."""
    from onnxprune.checks.verify import session

    sessions = {}
    for name, model in models.items():
        sess = session(model)
        sessions[name] = (sess, {sess.get_inputs()[0].name: images})
    names = list(sessions)
    for _ in range(warmup):
        for name in names:
            sess, feed = sessions[name]
            sess.run(None, feed)
    times = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            sess, feed = sessions[name]
            t = time.perf_counter()
            sess.run(None, feed)
            times[name].append(time.perf_counter() - t)
    return {name: float(np.median(v)) for name, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="ONNX model (default: the wide sample)")
    p.add_argument("--rates", nargs="+", type=float, default=[0.25, 0.4375, 0.5625, 0.6875])
    p.add_argument("--groups", default="8", help="onnxprune --groups (8 or auto)")
    p.add_argument("--calib-size", type=int, default=512)
    p.add_argument("--batch", type=int, default=1, help="images per timed call")
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--subset", action="store_true", help="evaluate on samples/fmnist_eval.npz (2k)")
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--out", default=str(HERE / "pareto_wide.png"))
    p.add_argument("--json", help="also write the table as JSON")
    args = p.parse_args(argv)
    groups = args.groups if args.groups == "auto" else int(args.groups)
    path, note = (Path(args.model), "") if args.model else find_wide_model()
    if note:
        print(f"note: {note}")
    arch = "wide_resnet" if path.stem.startswith("wide") else path.stem.split("_")[0]
    data = load_dataset(str(SAMPLES / "fmnist_eval.npz") if args.subset else None)
    print(f"model {path}; evaluation data: {data.description}")
    dense = onnx.load(str(path))
    entries = {"dense": {"method": "dense", "rate": None, "model": dense, "macs": count_macs(normalize(dense))[0]}}
    tmp = Path("/tmp/onnxprune_pareto")
    tmp.mkdir(exist_ok=True)
    n = args.calib_size
    for rate in args.rates:
        pruned, rep, wall = accuracy.run_onnxprune(path, rate, groups, n)
        entries[f"onnxprune r={rate}"] = {"method": "onnxprune --calib", "rate": rate, "model": pruned,
                                          "macs": rep["macs_after"], "wall_s": wall}
        print(f"  onnxprune rate {rate}: {rep['macs_after'] / 1e6:.2f} MMACs, {wall:.1f}s", flush=True)
        if args.no_peers:
            continue
        target = rep["macs_after"]
        for label, build in (("onnxsim Wanda+BN", lambda: accuracy.onnxsim_peer(path, target, n)),
                             ("Torch-Pruning L1+BN", lambda: accuracy.torch_pruning_peer(arch, path, target, n, tmp))):
            try:
                model, macs, sparsity = build()
            except Exception as exc:  # a failing peer must not stop the plot
                print(f"  {label} at rate {rate}: skipped ({type(exc).__name__}: {str(exc)[:120]})")
                continue
            entries[f"{label} r={rate}"] = {"method": label, "rate": rate, "model": model, "macs": macs,
                                            "sparsity": sparsity}
    images = next(iter(accuracy.load_calibration_inputs(str(accuracy.CALIB), dense, args.batch).values()))
    latency = interleaved_latency({k: v["model"] for k, v in entries.items()}, images, args.rounds)
    rows = []
    for key, e in entries.items():
        top1 = evaluate(e["model"], data)["top1"]
        rows.append({"name": key, "method": e["method"], "rate": e["rate"], "macs": e["macs"], "top1": top1,
                     "latency_ms": 1e3 * latency[key], "latency_ratio": latency[key] / latency["dense"]})
    print(f"\n{'entry':28} {'MMACs':>8} {'top1':>6} {'latency ms':>10} {'ratio':>6}")
    for r in rows:
        print(f"{r['name']:28} {r['macs'] / 1e6:8.2f} {100 * r['top1']:6.2f} {r['latency_ms']:10.3f} "
              f"{r['latency_ratio']:6.3f}")
    plot(rows, args.out, f"{path.name}, onnxprune --groups {args.groups} --calib-size {n}, batch {args.batch}, "
                         f"{Path(str(data.description)).name}")
    print(f"wrote {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def plot(rows: list[dict], out: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, marker in (("onnxprune --calib", "o-"), ("onnxsim Wanda+BN", "s--"), ("Torch-Pruning L1+BN", "^--")):
        pts = sorted((r["latency_ratio"], 100 * r["top1"]) for r in rows if r["method"] == method)
        if pts:
            ax.plot(*zip(*pts), marker, label=method)
    dense = next(r for r in rows if r["method"] == "dense")
    ax.plot([1.0], [100 * dense["top1"]], "k*", markersize=12, label="dense")
    ax.set_xlabel("ORT CPU latency / dense latency (median, interleaved)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
