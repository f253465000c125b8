#!/usr/bin/env bash
# Install everything, then run the test suite (pytest exits non-zero on any failure and on
# "no tests collected").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
