"""Why is EfficientNet-Lite0 slow in NHWC on the H100? Times dense MobileNetV2 and
EfficientNet-Lite0 (skeletons from ``gpu_time_models.py skeleton``) in fp32/fp16 x NCHW/NHWC at
batch 128 side by side, then writes an ORT profile by op type (the profile includes the warm-up
runs, so cuDNN's EXHAUSTIVE algorithm search: op shares, not steady-state times).

    RUN=benchmarks/gpu_layout_probe.py MODELS_DIR=.gpu/models bash benchmarks/gpu_session.sh OUT
    PROV=cpu B=2 python benchmarks/gpu_layout_probe.py OUT      # a dry run on the CPU

Measured 2026-11-28 on one H100 (``results/gpu_h100_s11/layout_probe.json``; README "CUDA, eleventh
session").
"""
import json, sys, time, collections, os
from pathlib import Path
import numpy as np, onnx, onnxruntime as ort
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from gpu_time_models import filled
from onnxprune.rewriting.precision import to_fp16
from onnxprune.checks.bench import Settings, compare
out = Path(sys.argv[1])
PROV = os.environ.get("PROV", "cuda"); B = int(os.environ.get("B", "128"))
EP = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}[PROV]
M = Path(os.environ.get("MODELS_DIR", ".gpu/models"))
nets = {"effnet": filled(M / "efficientnet_lite0_real__dense.onnx"), "mbv2": filled(M / "mobilenet_v2_real__dense.onnx")}
half = {k: to_fp16(m)[0] for k, m in nets.items()}
res = {}
for prec, models in (("fp32", nets), ("fp16", half)):
    for nhwc in (False, True):
        r = compare(list(models.values()), list(models), [B], Settings(provider=PROV, prefer_nhwc=nhwc and PROV == "cuda"), repeat=10, warmup=3)
        rows = {row["model"]: row["median_ms"] for row in r["results"][0]["rows"]}
        res[f"{prec}_{'nhwc' if nhwc else 'nchw'}"] = rows
        print(prec, "nhwc" if nhwc else "nchw", rows, flush=True)
prof = {}
for label, model, nhwc in (("effnet_fp16_nhwc", half["effnet"], True), ("effnet_fp16_nchw", half["effnet"], False), ("effnet_fp32_nchw", nets["effnet"], False)):
    so = ort.SessionOptions(); so.enable_profiling = True; so.profile_file_prefix = f"/tmp/prof_{label}"
    opts = Settings(provider="cuda", prefer_nhwc=nhwc).cuda_options() if PROV == "cuda" else {}
    s = ort.InferenceSession(model.SerializeToString(), so, providers=[(EP, opts), "CPUExecutionProvider"] if PROV == "cuda" else ["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((B, 3, 224, 224), dtype=np.float32)
    name = s.get_inputs()[0].name
    for _ in range(8): s.run(None, {name: x})
    path = s.end_profiling()
    ev = json.load(open(path))
    by = collections.Counter(); prov = collections.Counter(); n = collections.Counter()
    for e in ev:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"].get("op_name"); by[op] += e["dur"]; prov[e["args"].get("provider")] += e["dur"]; n[op] += 1
    prof[label] = {"by_op_us": by.most_common(15), "by_provider_us": prov.most_common(), "count": n.most_common(15)}
    print(label, by.most_common(8), prov.most_common(), flush=True)
(out / "layout_probe.json").write_text(json.dumps({"times": res, "profile": prof}, indent=1))
