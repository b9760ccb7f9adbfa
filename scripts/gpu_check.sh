#!/usr/bin/env bash
# One prepared GPU check of issue 20 (about 10 min on one H100): benchmarks/gpu.py's
# sampling rows (our sampler and vLLM at 1B and 7B shapes) and a sampled evaluation of an
# exported tiny model through both engines, figures into ${OUT:-/tmp/gpu_check}.
#
#   bash scripts/gpu_check.sh            # after bash scripts/setup.sh and scripts/setup_vllm.sh
#
# vLLM must be importable from VLLM_PYTHON (default .venv-vllm/bin/python; on a GPU machine
# scripts/setup_vllm.sh installs the CUDA build `vllm`). Without it the vLLM rows are
# left out and the script says so: it does not install anything (GPU machines here have
# no network, and vLLM's wheels are far too large to carry).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
python=${PYTHON:-.venv/bin/python}
vllm_python=${VLLM_PYTHON:-.venv-vllm/bin/python}
export PYTHONUNBUFFERED=1
if ! "$vllm_python" -c "import vllm" 2> /dev/null; then
  echo "NO vLLM at $vllm_python: only our sampler's rows are measured" | tee "$out/vllm_missing.txt"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
timeout 420 "$python" benchmarks/gpu.py --only sampling --vllm-python "$vllm_python" \
  2>&1 | tee "$out/gpu_sampling.txt" | grep -v -E "INFO|WARNING" || true
timeout 240 "$python" benchmarks/vllm_throughput.py --ns 200 --problems 100 \
  --judge --vllm-python "$vllm_python" --model-dir "$out/tiny-base" 2>&1 | tee "$out/tiny_engines.txt" \
  | grep -E "^\{|^\|" || true
