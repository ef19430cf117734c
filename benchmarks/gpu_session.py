"""One prepared run on a lent GPU machine (issue 11): build, convert, then time in priority order.

Why one script: a session's device time is 15 minutes, start-up included, so everything a GPU
can answer is asked in one call, most important first, each step's result written to OUT as soon
as it exists (a step cut short by the time limit loses only itself). ``gpu_session.sh`` sets up
onnxruntime-gpu and the CUDA libraries, then runs this.

Steps (``--until`` seconds from the start bound the whole run; a step that would not fit is
skipped and named):
1. build (CPU, two processes): ``speed.py --build-only`` for ResNet-50 and MobileNetV2 at 0.58
   and 0.40 of the MACs: dense, the paper's G=8, onnxprune default planned for CPU and for CUDA,
   Torch-Pruning at equal MACs;
2. the G=8 models in every ``grouped_forms`` form (exactness checked on the CPU provider);
3. fp16 copies of everything (``precision.to_fp16``, as ``--precision fp16`` writes them);
4. timing with ``onnxprune.checks.bench.compare`` (interleaved, IOBinding, EXHAUSTIVE), phases:
   fp16 NHWC batch 128 (issue 11's target setting), fp16 NHWC CUDA graph batch 1, fp16 NCHW
   batch 128, fp32 NCHW batch 32, fp32 batch 1. Each phase's JSON carries every model's Conv
   keys (``cost_fit.model_conv_ops``), so the rows are cost-model samples as they stand.

    python benchmarks/gpu_session.py --out OUT [--work DIR] [--until 500] [--provider cuda]

``--provider cpu`` runs the same steps on the CPU (a dry run; slow at batch 128: use
``--batch-scale``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxprune.checks.bench import Settings, compare  # noqa: E402
from onnxprune.planning import cost_fit  # noqa: E402
from onnxprune.rewriting.grouped_forms import FORMS, to_form  # noqa: E402
from onnxprune.rewriting.precision import to_fp16  # noqa: E402

NETWORKS = ("resnet50", "mobilenet_v2")
START = time.time()


def log(msg: str) -> None:
    print(f"[gpu {time.time() - START:6.1f}s] {msg}", flush=True)


def build(work: Path) -> None:
    """Both MACs points in parallel processes (each mostly single-threaded)."""
    procs = []
    for target in ("0.58", "0.40"):
        cmd = [sys.executable, str(ROOT / "benchmarks/speed.py"), "--models", *NETWORKS, "--peers", "torch-pruning",
               "--planners", "fidelity", "--auto-for", "cpu", "cuda", "--target-macs", target, "--build-only",
               "--out", str(work / f"m{target[2:]}")]
        procs.append(subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "6"}))
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"build failed: {p.args}")


def variants(work: Path, net: str) -> dict[str, Path]:
    """label -> fp32 model path, in the order they are timed (dense first)."""
    m58, m40 = work / "m58", work / "m40"
    out = {"dense": m58 / f"{net}__dense.onnx"}
    for form in FORMS:
        out[f"g8-{form}"] = work / "forms" / f"{net}__g8-{form}.onnx"
    out.update({"auto-cpu-58": m58 / f"{net}__auto-cpu-fidelity.onnx", "auto-cuda-58": m58 / f"{net}__auto-cuda-fidelity.onnx",
                "tp-58": m58 / f"{net}__torchpruning.onnx", "auto-cpu-40": m40 / f"{net}__auto-cpu-fidelity.onnx",
                "auto-cuda-40": m40 / f"{net}__auto-cuda-fidelity.onnx", "tp-40": m40 / f"{net}__torchpruning.onnx"})
    return out


def write_forms(work: Path) -> dict:
    """Every grouped form of each G=8 model, checked equal to the grouped one on the CPU provider."""
    import onnxruntime as ort

    (work / "forms").mkdir(exist_ok=True)
    checks = {}
    for net in NETWORKS:
        g8 = onnx.load(work / "m58" / f"{net}__g8.onnx")
        x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)

        def run(model):
            s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            return s.run(None, {s.get_inputs()[0].name: x})[0]

        ref = run(g8)
        for form in FORMS:
            model, report = to_form(g8, form)
            err = float(np.abs(run(model) - ref).max() / np.abs(ref).max())
            onnx.save(model, work / "forms" / f"{net}__g8-{form}.onnx")
            checks[f"{net}/{form}"] = {"changed": len(report["changed"]), "kept": len(report["kept"]), "rel_err": err}
            log(f"{net} g8 {form}: {len(report['changed'])} Convs changed, {len(report['kept'])} kept, rel err {err:.1e}")
    return checks


def _half(args):
    src, dst = args
    model, _ = to_fp16(onnx.load(src))
    onnx.save(model, dst)
    return dst


def write_fp16(work: Path) -> None:
    (work / "fp16").mkdir(exist_ok=True)
    jobs = [(p, work / "fp16" / f"{net}__{label}.onnx") for net in NETWORKS for label, p in variants(work, net).items()]
    with ProcessPoolExecutor(8) as pool:
        list(pool.map(_half, jobs))


PHASES = [  # name, precision, settings, batch, labels (None: all), estimated seconds
    ("fp16_nhwc_b128", "fp16", dict(prefer_nhwc=True), 128, None, 110),
    ("fp16_nhwc_graph_b1", "fp16", dict(prefer_nhwc=True, cuda_graph=True), 1,
     ["dense", "g8-union", "g8-matmul", "auto-cpu-58", "auto-cuda-58", "tp-58", "auto-cpu-40", "tp-40"], 50),
    ("fp16_nchw_b128", "fp16", {}, 128, None, 100),
    ("fp32_nchw_b32", "fp32", {}, 32, None, 80),
    ("fp32_nchw_b1", "fp32", {}, 1, None, 50),
]


def time_phase(work: Path, out: Path, name, precision, extra, batch, labels, provider, repeat, batch_scale) -> None:
    data = {"phase": name, "precision": precision, "networks": {}}
    for net in NETWORKS:
        table = variants(work, net)
        chosen = [label for label in table if labels is None or label in labels]
        paths = [table[label] if precision == "fp32" else work / "fp16" / f"{net}__{label}.onnx" for label in chosen]
        models = [onnx.load(p) for p in paths]
        settings = Settings(provider=provider, **(extra if provider == "cuda" else {}))  # cpu: a dry run
        b = max(1, batch // batch_scale)
        try:
            report = compare(models, chosen, [b], settings, repeat=repeat, warmup=5)
        except Exception as exc:  # e.g. a model a CUDA graph cannot capture: time the rest
            log(f"{name} {net}: {type(exc).__name__}: {exc}; timing one by one beside dense")
            report = {"error": f"{type(exc).__name__}: {exc}", "results": []}
            for label, model in zip(chosen[1:], models[1:]):
                try:
                    pair = compare([models[0], model], ["dense", label], [b], settings, repeat=repeat, warmup=5)
                    report["results"].append(pair["results"][0])
                except Exception as exc2:
                    report.setdefault("failed", {})[label] = f"{type(exc2).__name__}: {exc2}"
        fp32 = [onnx.load(table[label], load_external_data=False) for label in chosen]
        report["conv_ops"] = {label: [op.key for op in cost_fit.model_conv_ops(m, b)] for label, m in zip(chosen, fp32)}
        data["networks"][net] = report
        for result in report.get("results", []):
            for row in result["rows"]:
                log(f"{name} {net} b{row['batch']} {row['model']:14s} {row['median_ms']:8.3f} ms "
                    f"{row['speedup_vs_first']:.3f}x {row.get('paired_ratio', '')}")
        (out / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/gpu_work")
    ap.add_argument("--until", type=float, default=500, help="seconds from the start the run must end by")
    ap.add_argument("--provider", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--batch-scale", type=int, default=1, help="divide every batch by this (CPU dry run)")
    ap.add_argument("--skip-build", action="store_true")
    args = ap.parse_args()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if not args.skip_build:
        build(work)
        log("built")
    checks = write_forms(work)
    (out / "forms.json").write_text(json.dumps(checks, indent=1) + "\n")
    write_fp16(work)
    log("fp16 written")
    for name, precision, extra, batch, labels, estimate in PHASES:
        left = args.until - (time.time() - START)
        if left < estimate:
            log(f"skipped {name}: {left:.0f}s left, needs ~{estimate}s")
            continue
        t0 = time.time()
        try:
            time_phase(work, out, name, precision, extra, batch, labels, args.provider, args.repeat, args.batch_scale)
        except Exception as exc:
            log(f"{name} failed: {type(exc).__name__}: {exc}")
        log(f"{name} took {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
