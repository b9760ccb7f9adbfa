#!/usr/bin/env bash
# Set up everything on a fresh machine: a .venv at the repository root with the
# pinned torch, the wmtp package and its tools. Safe to rerun (fast when done).
#
# torch is pinned to 2.13.0 and installed first: on a CUDA Linux machine PyPI's
# wheel is the CUDA build; on the CPU-only dev/CI machines pip's local wheel
# folder supplies the CPU build. The project's own range (torch>=2.4) is then
# already satisfied, so no other torch build is pulled in.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.wmtp-installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/setup.sh ]; then
  exit 0
fi
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet "torch==${WMTP_TORCH_VERSION:-2.13.0}"
.venv/bin/pip install --quiet -e ".[dev]"
touch "$stamp"
