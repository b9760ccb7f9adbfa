#!/usr/bin/env bash
# Set up everything on a fresh machine: a .venv at the repository root with exactly the
# versions of requirements.lock, then the wmtp package itself. Safe to rerun (fast when done).
#
# The lock pins `torch==2.13.0`: on a CUDA Linux machine pip takes PyPI's CUDA build (with
# the nvidia-* wheels that build pins); on the CPU-only dev/CI machines pip's local wheel
# folder supplies 2.13.0+cpu, which meets the same pin. scripts/lock.sh regenerates the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.wmtp-installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt requirements.lock ] \
  && [ "$stamp" -nt scripts/setup.sh ]; then
  exit 0
fi
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -r requirements.lock
.venv/bin/pip install --quiet --no-deps -e .
.venv/bin/pip check
touch "$stamp"
