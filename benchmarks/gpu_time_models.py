#!/usr/bin/env python
"""Time models built here on a lent GPU, carrying only their structure.

Why: a device call carries at most 64 MiB with the working tree, and onnxruntime-gpu alone takes
60 MB of it (``slim_ort_gpu.py``). Models whose plans need this machine's data (``--calib`` on the
real photos, minutes per model on 2 cores) cannot be rebuilt on the GPU machine, and their weights
do not fit beside the runtime. Latency does not depend on the weights' values, only on the
graph and tensor shapes, so the models travel as *skeletons*: the graph with every float
initializer of 256 or more elements stored as external data whose file stays behind. On the GPU
machine each such tensor is filled with seeded random values of its shape (fan-in scaled, so fp16
copies stay finite on most nets) and the models are timed side by side as ``gpu_session.py`` does.

    # here: a manifest (JSON: {"net": [["label", "path/to/model.onnx"], ...], ...}; dense first)
    python benchmarks/gpu_time_models.py skeleton MANIFEST.json .gpu/models
    # on the GPU machine (gpu_session.sh sets up onnxruntime-gpu, then SCRIPT=... runs this)
    python benchmarks/gpu_time_models.py time .gpu/models --out OUT --until 420

Each phase's JSON (rows, paired ratios, MACs of every model) is written to OUT as soon as it is
done, so a run cut short keeps the phases it finished.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

START = time.time()
MIN_ELEMENTS = 256  # smaller tensors (BN-free biases, shape constants) travel as they are
FLOAT = onnx.TensorProto.FLOAT


def log(msg: str) -> None:
    print(f"[gpu {time.time() - START:6.1f}s] {msg}", flush=True)


def skeleton(manifest: Path, out: Path) -> None:
    """Copy each model of ``manifest`` into ``out`` with its large float tensors' data left out."""
    from onnxprune.ir.macs import count_macs

    out.mkdir(parents=True, exist_ok=True)
    nets = json.loads(manifest.read_text())
    index = {}
    for net, entries in nets.items():
        index[net] = []
        dense_macs = None
        for label, path in entries:
            model = onnx.load(path)
            macs = count_macs(model)[0]
            dense_macs = dense_macs or macs
            name = f"{net}__{label}.onnx"
            external_data_helper.convert_model_to_external_data(
                model, all_tensors_to_one_file=True, location=f"{name}.missing", size_threshold=MIN_ELEMENTS * 4)
            # onnx.save would write the data file; the skeleton keeps only the references
            for tensor in external_data_helper._get_all_tensors(model):
                if external_data_helper.uses_external_data(tensor):
                    tensor.ClearField("raw_data")
            (out / name).write_bytes(model.SerializeToString())
            index[net].append({"label": label, "file": name, "macs_ratio": round(macs / dense_macs, 4),
                               "source": str(path)})
            log(f"{net} {label}: MACs x{macs / dense_macs:.3f}, skeleton {(out / name).stat().st_size / 1e3:.0f} kB")
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n")


def filled(path: Path) -> onnx.ModelProto:
    """The skeleton at ``path`` with seeded random data in every tensor whose data was left out."""
    model = onnx.load(path, load_external_data=False)
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        if tensor.data_type != FLOAT:
            raise SystemExit(f"{path.name}: {tensor.name} is not float; skeletons drop only float data")
        dims = tuple(tensor.dims)
        fan_in = int(np.prod(dims[1:])) if len(dims) > 1 else 100
        rng = np.random.default_rng(zlib.crc32(tensor.name.encode()))
        values = (rng.standard_normal(dims) / np.sqrt(max(fan_in, 1))).astype(np.float32)
        tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    return model


PHASES = [  # name, precision, settings, batch, estimated seconds per model
    ("fp16_nhwc_b128", "fp16", dict(prefer_nhwc=True), 128, 4.0),
    ("fp32_nchw_b32", "fp32", {}, 32, 3.0),
    ("fp16_nhwc_graph_b1", "fp16", dict(prefer_nhwc=True, cuda_graph=True), 1, 3.0),
    ("fp32_nchw_b1", "fp32", {}, 1, 2.0),
]


def time_all(models_dir: Path, out: Path, until: float, repeat: int, provider: str, batch_scale: int) -> None:
    from onnxprune.checks.bench import Settings, compare
    from onnxprune.rewriting.precision import to_fp16

    out.mkdir(parents=True, exist_ok=True)
    index = json.loads((models_dir / "index.json").read_text())
    fp32 = {net: [filled(models_dir / e["file"]) for e in entries] for net, entries in index.items()}
    fp16 = {net: [to_fp16(m)[0] for m in ms] for net, ms in fp32.items()}
    log(f"filled and converted {sum(len(v) for v in fp32.values())} models")
    n_models = sum(len(v) for v in fp32.values())
    for name, precision, extra, batch, per_model in PHASES:
        left = until - (time.time() - START)
        if left < per_model * n_models:
            log(f"skipped {name}: {left:.0f}s left, needs ~{per_model * n_models:.0f}s")
            continue
        t0 = time.time()
        data = {"phase": name, "precision": precision, "networks": {}}
        for net, entries in index.items():
            labels = [e["label"] for e in entries]
            models = (fp32 if precision == "fp32" else fp16)[net]
            settings = Settings(provider=provider, **(extra if provider == "cuda" else {}))
            b = max(1, batch // batch_scale)
            try:
                report = compare(models, labels, [b], settings, repeat=repeat, warmup=5)
            except Exception as exc:  # one model a CUDA graph cannot capture must not lose the phase
                report = {"error": f"{type(exc).__name__}: {exc}"}
                log(f"{name} {net}: {report['error']}")
            report["index"] = entries
            data["networks"][net] = report
            for result in report.get("results", []):
                for row, entry in zip(result["rows"], entries):
                    log(f"{name} {net:18s} {row['model']:22s} MACs x{entry['macs_ratio']:.3f} "
                        f"{row['median_ms']:8.3f} ms {row['speedup_vs_first']:.3f}x "
                        f"paired {row.get('paired_ratio', '-')}")
            (out / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
        log(f"{name} took {time.time() - t0:.0f}s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sk = sub.add_parser("skeleton")
    sk.add_argument("manifest", type=Path)
    sk.add_argument("out", type=Path)
    tm = sub.add_parser("time")
    tm.add_argument("models", type=Path)
    tm.add_argument("--out", type=Path, required=True)
    tm.add_argument("--until", type=float, default=420, help="seconds from the start the run must end by")
    tm.add_argument("--repeat", type=int, default=15)
    tm.add_argument("--provider", default="cuda", choices=["cpu", "cuda"])
    tm.add_argument("--batch-scale", type=int, default=1, help="divide every batch by this (CPU dry run)")
    args = ap.parse_args()
    if args.cmd == "skeleton":
        skeleton(args.manifest, args.out)
    else:
        time_all(args.models, args.out, args.until, args.repeat, args.provider, args.batch_scale)


if __name__ == "__main__":
    main()
