#!/usr/bin/env bash
# A scratch environment with verl, for the minpro-verl plugin's tests: .venv-verl.
# verl 0.9.1 pins transformers < 5.11, minpro's CLI needs >= 5.24: minpro goes in with
# --no-deps (the objectives the plugin uses need only torch and pydantic).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv-verl/bin/python ]; then
    "$PYTHON" -m venv .venv-verl
fi
.venv-verl/bin/python -m pip install --quiet --upgrade pip
# torch first and in the same command, so pip takes the local CPU wheel, not a CUDA build
.venv-verl/bin/python -m pip install --quiet "torch==2.13.0" "verl==0.9.1" "pytest>=8" cachetools uvicorn fastapi  # ray_trainer imports these, which verl does not declare
.venv-verl/bin/python -m pip install --quiet --no-deps -e . -e plugins/minpro-verl
.venv-verl/bin/python -m pytest -q -p no:cacheprovider plugins/minpro-verl/tests
