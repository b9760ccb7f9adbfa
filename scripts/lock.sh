#!/usr/bin/env bash
# Regenerate requirements.lock, the exact versions scripts/setup.sh installs, and the
# pins of the rules' conda envs (envs/{train,eval,report}.yaml) from it. The lock is
# only ever written by this script:
#
#   bash scripts/lock.sh                        # keep the locked versions, add what is new
#   bash scripts/lock.sh --upgrade              # newest versions pyproject.toml allows
#   bash scripts/lock.sh --upgrade-package NAME # newest NAME, the rest kept
#
# Resolved by uv (`uv pip compile`) for CPython 3.11 on Linux x86_64, the machines the
# pipeline runs on, against torch's CPU build: its dependencies are the ones every
# machine needs. On a CUDA machine pip takes PyPI's CUDA build of the same torch
# version, which adds the nvidia-* and triton wheels that build pins exactly itself.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=2.13.0  # the one torch pin: the lock carries it to setup.sh and the envs
[ -x .venv/bin/uv ] || bash scripts/setup.sh
# the CPU torch wheel: pip's local wheel folder where there is one, else PyTorch's CPU index
find_links=$(.venv/bin/pip config get global.find-links 2>/dev/null || true)
if [ -n "$find_links" ]; then torch_source=(--find-links "$find_links"); else torch_source=(--torch-backend cpu); fi
constraint=$(mktemp)
trap 'rm -f "$constraint"' EXIT
echo "torch==${TORCH_VERSION}+cpu" >"$constraint"
.venv/bin/uv pip compile pyproject.toml --extra dev --quiet \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --constraint "$constraint" "${torch_source[@]}" --no-emit-find-links \
  --custom-compile-command "bash scripts/lock.sh" --output-file requirements.lock "$@"
# one line for both builds: `torch==X` is met by X+cpu (CPU machines) and X (CUDA, PyPI)
sed -i "s/^torch==${TORCH_VERSION}+cpu\$/torch==${TORCH_VERSION}/" requirements.lock
.venv/bin/python scripts/sync_env_pins.py
