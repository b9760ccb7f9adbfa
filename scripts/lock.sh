#!/usr/bin/env bash
# Regenerate requirements.lock, the exact versions scripts/setup.sh installs, and the
# pins of the rules' conda envs (envs/{train,eval,report}.yaml) from it. The lock is
# only ever written by this script:
#
#   bash scripts/lock.sh                        # keep the locked versions, add what is new
#   bash scripts/lock.sh --upgrade              # newest versions pyproject.toml allows
#   bash scripts/lock.sh --upgrade-package NAME # newest NAME, the rest kept
#   bash scripts/lock.sh --check                # fail (with the diff) if the lock is stale
#
# Resolved by uv (`uv pip compile`) for CPython 3.11 on Linux x86_64, the machines the
# pipeline runs on, against torch's CPU build: its dependencies are the ones every
# machine needs. On a CUDA machine pip takes PyPI's CUDA build of the same torch
# version (pinned in scripts/lock-constraints.txt), which adds the nvidia-* and triton
# wheels that build pins exactly itself.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/uv ] || bash scripts/setup.sh
# the CPU torch wheel: pip's local wheel folder where there is one, else PyTorch's CPU index
find_links=$(.venv/bin/pip config get global.find-links 2>/dev/null || true)
if [ -n "$find_links" ]; then torch_source=(--find-links "$find_links"); else torch_source=(--torch-backend cpu); fi
out=$(mktemp)
trap 'rm -f "$out"' EXIT
check=false
if [ "${1:-}" = --check ]; then check=true; shift; fi
cp requirements.lock "$out"  # uv keeps the versions of the file it writes to
.venv/bin/uv pip compile pyproject.toml --extra dev --quiet \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --constraint scripts/lock-constraints.txt "${torch_source[@]}" \
  --custom-compile-command "bash scripts/lock.sh" --output-file "$out" "$@"
# one line for both builds: `torch==X` is met by X+cpu (CPU machines) and X (CUDA, PyPI)
sed -i "s/^torch==\(.*\)+cpu\$/torch==\1/" "$out"
if $check; then
  diff -u requirements.lock "$out" || { echo "requirements.lock is stale: run bash scripts/lock.sh" >&2; exit 1; }
  exit 0
fi
cp "$out" requirements.lock
.venv/bin/python scripts/sync_env_pins.py
