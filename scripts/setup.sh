#!/usr/bin/env bash
# Create .venv in the repo and install minpro with its test extra.
# torch==2.13.0 comes first and in the same pip command as everything that depends on it,
# so pip takes the CPU wheel instead of resolving a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0" -e ".[test]"
