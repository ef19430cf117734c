#!/usr/bin/env bash
# Set up onnxruntime-gpu on a lent GPU machine and run benchmarks/gpu_session.py (one call).
#
#   benchmarks/gpu_session.sh OUT [UNTIL_SECONDS]       (TRIAL=1: gpu_traffic_trial.py instead;
#                                                         MODELS=DIR: gpu_time_models.py time DIR;
#                                                         RUN=SCRIPT: python3 SCRIPT OUT, e.g. a probe)
#
# Expects, in the repo's ignored .ort/ (carried to the machine):
#   ort_slim.tar.xz   onnxruntime-gpu's cp312 wheel unpacked, without libonnxruntime.so.* (the C
#                     API library; Python does not load it) and the TensorRT provider, with the
#                     CUDA provider's kernels for GPUs other than sm_90 zeroed (an H100/H200 loads
#                     only its own; 60 MB compressed instead of 195 MB, so it fits one call);
#   torch_pruning-*.whl  the peer.
# How ort_slim.tar.xz is made is in benchmarks/README.md ("GPU runs"). The machine's own
# nvidia-* CUDA 13 libraries go on LD_LIBRARY_PATH.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_session.sh OUT [UNTIL_SECONDS]}
until=${2:-500}
mkdir -p "$out" /tmp/site
t0=$(date +%s)
python3 -c "import tarfile; tarfile.open('.ort/ort_slim.tar.xz').extractall('/tmp/site')" || exit 3
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .ort/torch_pruning-*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD
libs=$(python3 - <<'PY'
import glob, os, site
dirs = {os.path.dirname(p) for s in site.getsitepackages() for p in glob.glob(f"{s}/nvidia/**/lib*.so*", recursive=True)}
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH=${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
echo "setup took $(( $(date +%s) - t0 ))s"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
python3 - <<'PY' || { ldd /tmp/site/onnxruntime/capi/libonnxruntime_providers_cuda.so | grep -i "not found"; exit 4; }
import numpy as np, onnx, onnxruntime as ort
from onnx import helper, TensorProto, numpy_helper
print("onnxruntime", ort.__version__, ort.__file__, ort.get_available_providers())
w = np.random.default_rng(0).standard_normal((16, 8, 3, 3)).astype(np.float32)
g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "g",
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]); m.ir_version = 8
x = np.random.default_rng(1).standard_normal((1, 8, 16, 16)).astype(np.float32)
cpu = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
s = ort.InferenceSession(m.SerializeToString(), providers=["CUDAExecutionProvider"])
assert s.get_providers()[0] == "CUDAExecutionProvider", s.get_providers()
gpu = s.run(None, {"x": x})[0]
print("CUDA sanity: max |gpu - cpu| =", float(np.abs(gpu - cpu).max()))
assert np.abs(gpu - cpu).max() < 1e-2
PY
left=$(( until - ($(date +%s) - t0) ))
if [[ -n "${RUN:-}" ]]; then  # any other prepared script, after the same setup
    PYTHONUNBUFFERED=1 python3 "$RUN" "$out"
elif [[ -n "${MODELS:-}" ]]; then  # skeletons built on another machine (gpu_time_models.py)
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_time_models.py time "$MODELS" --out "$out" --until "$left"
elif [[ "${TRIAL:-0}" == "1" ]]; then  # the activation-traffic trial instead (gpu_traffic_trial.py)
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_traffic_trial.py --out "$out"
else
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_session.py --out "$out" --until "$left"
fi
