#!/usr/bin/env bash
# bench/gpu_smoke.sh - `make gpu-smoke`: every first-day command on one GPU in under 8 minutes
# (bench/gpu_smoke.py says what runs). Prints "skipped: no GPU" and exits 0 where there is none.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
exec "$PYTHON" bench/gpu_smoke.py "$@"
