#!/usr/bin/env bash
# A separate environment for the TRL comparison: TRL is never a dependency of minpro.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x benchmarks/.venv-trl/bin/python ] || "$PYTHON" -m venv benchmarks/.venv-trl
benchmarks/.venv-trl/bin/python -m pip install --quiet --upgrade pip
benchmarks/.venv-trl/bin/python -m pip install --quiet "torch==2.13.0" "trl==1.16.0" -e .
