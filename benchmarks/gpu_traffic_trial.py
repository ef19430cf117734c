"""A CUDA activation-traffic term, tried on the GPU: does it close ResNet-50's gap to Torch-Pruning?

Why: the eighth session's H100 run (``gpu_session.py``) found the default ResNet-50 plan 11%
slower than Torch-Pruning at equal MACs in fp16 NHWC batch 128, with its cuts in the late stages,
and a fit to those rows charging the activation maps, not the MACs. The CUDA profile has no
traffic term (``latency.PROFILES["cuda"].mac_per_activation`` = 0). This plans the default with
that term set to a few values (the profile patched in this process only; the library is
unchanged) and times the plans beside dense, the current CUDA plan and Torch-Pruning.

    python benchmarks/gpu_traffic_trial.py --out OUT [--work DIR] [--values 30 300]

Run on the GPU machine through ``gpu_session.sh``'s setup (``TRIAL=1``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxprune.checks.bench import Settings, compare  # noqa: E402
from onnxprune.ir.macs import count_macs  # noqa: E402
from onnxprune.ir.normalize import normalize  # noqa: E402
from onnxprune.planning import cost_fit  # noqa: E402
from onnxprune.rewriting.precision import to_fp16  # noqa: E402

NETWORKS = ("resnet50", "mobilenet_v2")
PHASES = [("fp16_nhwc_b128", "fp16", dict(prefer_nhwc=True), 128),
          ("fp16_nhwc_graph_b1", "fp16", dict(prefer_nhwc=True, cuda_graph=True), 1),
          ("fp32_nchw_b32", "fp32", {}, 32)]
START = time.time()


def log(msg: str) -> None:
    print(f"[trial {time.time() - START:6.1f}s] {msg}", flush=True)


PLAN = """
import dataclasses, sys
sys.path.insert(0, sys.argv[1])
import onnxprune.planning.latency as L
L.PROFILES["cuda"] = dataclasses.replace(L.PROFILES["cuda"], mac_per_activation=float(sys.argv[2]))
from onnxprune.ir.model_io import save_model
from onnxprune.pipeline import PruneConfig, prune
model, _ = prune(sys.argv[3], PruneConfig(provider="cuda", target_macs=float(sys.argv[4]), verify=False))
save_model(model, sys.argv[5])
"""  # a process per plan: the patched profile stays out of this one


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/trial_work")
    ap.add_argument("--values", type=float, nargs="+", default=[30.0, 300.0])
    ap.add_argument("--provider", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--batch-scale", type=int, default=1)
    args = ap.parse_args()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(ROOT / "benchmarks/speed.py"), "--models", *NETWORKS, "--peers",
                    "torch-pruning", "--planners", "fidelity", "--auto-for", "cuda", "--target-macs", "0.58",
                    "--build-only", "--out", str(work)], check=True)
    log("built")
    tables = {}
    for net in NETWORKS:
        tables[net] = {"dense": work / f"{net}__dense.onnx", "auto-cuda": work / f"{net}__auto-cuda-fidelity.onnx",
                       "tp": work / f"{net}__torchpruning.onnx"}
        macs = [count_macs(normalize(onnx.load(tables[net][k])))[0] for k in ("dense", "auto-cuda")]
        target = macs[1] / macs[0]
        for value in args.values:
            path = work / f"{net}__traffic{value:g}.onnx"
            subprocess.run([sys.executable, "-c", PLAN, str(ROOT), str(value), str(tables[net]["dense"]),
                            f"{target:.4f}", str(path)], check=True)
            tables[net][f"traffic{value:g}"] = path
        log(f"{net}: planned at x{target:.4f}")
    (work / "fp16").mkdir(exist_ok=True)
    for net, table in tables.items():
        for label, path in table.items():
            onnx.save(to_fp16(onnx.load(path))[0], work / "fp16" / f"{net}__{label}.onnx")
    log("fp16 written")
    for name, precision, extra, batch in PHASES:
        data = {"phase": name, "networks": {}}
        for net, table in tables.items():
            labels = list(table)
            paths = [table[k] if precision == "fp32" else work / "fp16" / f"{net}__{k}.onnx" for k in labels]
            models = [onnx.load(p) for p in paths]
            settings = Settings(provider=args.provider, **(extra if args.provider == "cuda" else {}))
            try:
                report = compare(models, labels, [max(1, batch // args.batch_scale)], settings, repeat=args.repeat,
                                 warmup=5)
            except Exception as exc:
                log(f"{name} {net}: {type(exc).__name__}: {exc}")
                continue
            report["conv_ops"] = {k: [op.key for op in cost_fit.model_conv_ops(onnx.load(table[k]), batch)]
                                  for k in labels}
            data["networks"][net] = report
            for row in report["results"][0]["rows"]:
                log(f"{name} {net} {row['model']:12s} {row['median_ms']:8.3f} ms {row['speedup_vs_first']:.3f}x "
                    f"{row.get('paired_ratio', '')}")
            (out / f"trial_{name}.json").write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
