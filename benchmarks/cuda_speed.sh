#!/usr/bin/env bash
# The speed benchmark on ONNX Runtime's CUDA provider, for a machine with an NVIDIA GPU.
#
# UNTESTED: written on a machine without a GPU. No network is used: if onnxruntime-gpu wheels
# were carried in .whl/, they are installed into /tmp/site and put first on PYTHONPATH.
#
#   benchmarks/cuda_speed.sh                 # build, prune and time everything (needs torch,
#                                            # onnxsim==0.8.1, torch-pruning==1.6.*); args go to speed.py
#   benchmarks/cuda_speed.sh --prebuilt DIR  # only time models made by `speed.py --out DIR`
#                                            # (DIR/<model>__{dense,g8,auto,onnxsim,torchpruning}.onnx)
#
# Settings are printed with the results: ORT_ENABLE_ALL, cudnn_conv_algo_search pinned to
# EXHAUSTIVE (it dominates conv timing; warm-up runs absorb the search), batch 1 and 8.
set -euo pipefail
cd "$(dirname "$0")/.."

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

python3 - <<'PY'
import onnxruntime as ort
providers = ort.get_available_providers()
print(f"onnxruntime {ort.__version__} from {ort.__file__}; providers: {', '.join(providers)}")
if "CUDAExecutionProvider" not in providers:
    raise SystemExit("CUDAExecutionProvider is not available: install onnxruntime-gpu (carry its wheel in .whl/)")
PY
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

if [[ "${1:-}" == "--prebuilt" ]]; then
    dir=${2:?usage: cuda_speed.sh --prebuilt DIR}
    for dense in "$dir"/*__dense.onnx; do
        name=$(basename "$dense" __dense.onnx)
        models=("$dense")
        for slug in g8 auto onnxsim torchpruning; do
            [[ -f "$dir/${name}__${slug}.onnx" ]] && models+=("$dir/${name}__${slug}.onnx")
        done
        echo "== $name"
        python3 -m onnxprune.cli bench "${models[@]}" --provider cuda --batch 1,8 --repeat 50 --warmup 10 \
            --cudnn-conv-algo-search EXHAUSTIVE --json "$dir/${name}_cuda.json"
    done
else
    python3 benchmarks/speed.py --provider cuda --repeat 50 "$@"
fi
