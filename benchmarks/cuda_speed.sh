#!/usr/bin/env bash
# The speed benchmark on ONNX Runtime's CUDA provider, for a machine with an NVIDIA GPU.
#
#   benchmarks/cuda_speed.sh build DIR [MODEL ...]   # export + prune (needs torch; CPU is enough):
#       DIR/<model>__{dense,g8,auto-cpu,auto-cuda}.onnx — the paper's G=8 and --groups auto planned
#       with the CPU and with the (analytical) CUDA cost model, all at the G=8 model's MACs
#   benchmarks/cuda_speed.sh time DIR [SECONDS]      # on the GPU machine: per dense model,
#       `onnxprune autotune --provider cuda` (a SECONDS budget, default 90) and one more auto plan
#       from that measured table (<model>__auto-measured.onnx), one more auto plan at 40% of the MACs
#       (<model>__auto-deeper.onnx), then every variant timed with `onnxprune bench --provider cuda`
#       side by side (interleaved, medians, inputs and outputs on the GPU), batch 1, 8 and 32; then
#       (on cuda, unless FP16_GRAPH=0) the same models converted to fp16 (DIR/fp16/, as `--precision
#       fp16` writes them: fp32 inputs and outputs) timed with `--nhwc --cuda-graph`, the deployment
#       settings; a model that cannot be captured as a CUDA graph is timed with `--nhwc` alone.
#
# onnxruntime-gpu must be importable (carried wheels: pip install --target, PYTHONPATH). The CUDA
# and cuDNN libraries of nvidia-* pip packages (e.g. the ones PyTorch brings) are put on
# LD_LIBRARY_PATH. Settings are printed with the results: ORT_ENABLE_ALL, cudnn_conv_algo_search
# pinned to EXHAUSTIVE (warm-up runs absorb the search).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mode=${1:?usage: cuda_speed.sh build|time DIR}
dir=${2:?usage: cuda_speed.sh build|time DIR}
mkdir -p "$dir"

if [[ "$mode" == "build" ]]; then
    shift 2
    models=("$@")
    [[ ${#models[@]} -gt 0 ]] || models=(resnet18 resnet50 mobilenet_v2)
    python3 benchmarks/speed.py --models "${models[@]}" --peers --auto-for cpu cuda --build-only --out "$dir"
    exit 0
fi

budget=${3:-90}
provider=${PROVIDER:-cuda}  # PROVIDER=cpu runs the same steps on the CPU (a dry run of this script)
batches=${BATCHES:-1,8,32}
repeat=${REPEAT:-50}
deeper=${DEEPER:-0.4}  # one more --groups auto model keeping this fraction of the MACs (analytical model)
libs=$(python3 - <<'PY'
import glob, os, site
dirs = {os.path.dirname(p) for s in site.getsitepackages() for p in glob.glob(f"{s}/nvidia/**/lib*.so*", recursive=True)}
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH=${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
python3 - <<'PY'
import onnxruntime as ort
providers = ort.get_available_providers()
print(f"onnxruntime {ort.__version__} from {ort.__file__}; providers: {', '.join(providers)}")
if "CUDAExecutionProvider" not in providers:
    print("CUDAExecutionProvider is not available: install onnxruntime-gpu")
PY
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

for dense in "$dir"/*__dense.onnx; do
    name=$(basename "$dense" __dense.onnx)
    table="$dir/${name}.latency-$provider.json"
    target=$(python3 -c "
import sys; from onnxprune.ir.macs import count_macs; from onnxprune.ir.model_io import load_model
from onnxprune.ir.normalize import normalize
d, g = (count_macs(normalize(load_model(p)))[0] for p in sys.argv[1:])
print(f'{g / d:.4f}')" "$dense" "$dir/${name}__g8.onnx")
    echo "== $name: autotune on $provider (${budget}s budget), then --groups auto --target-macs $target from the table"
    python3 -m onnxprune.cli autotune "$dense" --provider "$provider" --max-seconds "$budget" --out "$table"
    python3 -m onnxprune.cli "$dense" "$dir/${name}__auto-measured.onnx" --groups auto --provider "$provider" \
        --target-macs "$target" --latency-table "$table" --no-verify -q
    python3 -m onnxprune.cli "$dense" "$dir/${name}__auto-deeper.onnx" --groups auto --provider "$provider" \
        --target-macs "$deeper" --no-verify -q
    models=("$dense")
    for slug in g8 auto-cpu auto-cuda auto-measured auto-deeper; do
        [[ -f "$dir/${name}__${slug}.onnx" ]] && models+=("$dir/${name}__${slug}.onnx")
    done
    echo "== $name: timing ${#models[@]} models on $provider"
    python3 -m onnxprune.cli bench "${models[@]}" --provider "$provider" --batch "$batches" --repeat "$repeat" --warmup 10 \
        --cudnn-conv-algo-search EXHAUSTIVE --json "$dir/${name}_$provider.json"

    [[ "$provider" == "cuda" && "${FP16_GRAPH:-1}" == "1" ]] || continue
    mkdir -p "$dir/fp16"
    half=()
    for m in "${models[@]}"; do half+=("$dir/fp16/$(basename "$m")"); done
    python3 - "${models[@]}" <<'PY'
import os, sys
from onnxprune.ir.model_io import load_model, save_model
from onnxprune.rewriting.precision import to_fp16
for path in sys.argv[1:]:
    save_model(to_fp16(load_model(path))[0], os.path.join(os.path.dirname(path), "fp16", os.path.basename(path)))
PY
    common=("${half[@]}" --provider cuda --nhwc --batch "$batches" --repeat "$repeat" --warmup 10
            --cudnn-conv-algo-search EXHAUSTIVE)
    echo "== $name: timing ${#half[@]} fp16 models on cuda with --nhwc --cuda-graph"
    python3 -m onnxprune.cli bench "${common[@]}" --cuda-graph --json "$dir/${name}_cuda_fp16_nhwc_graph.json" || {
        echo "== $name: no CUDA graph (the error above says why): fp16 with --nhwc alone"
        python3 -m onnxprune.cli bench "${common[@]}" --json "$dir/${name}_cuda_fp16_nhwc.json"
    }
done
