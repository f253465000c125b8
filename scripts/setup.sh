#!/usr/bin/env bash
# Create .venv in the repo and install minpro with its test extra.
# torch==2.13.0 comes first and in the same pip command as everything that depends on it,
# so pip takes the CPU wheel instead of resolving a multi-GB CUDA build.
#
#   bash scripts/setup.sh                      # CPU torch (the README's default)
#   bash scripts/setup.sh --cuda [INDEX_URL]   # a CUDA build of torch instead (GPU machines)
#
# --cuda installs torch (MINPRO_TORCH, default torch==2.13.0) from PyPI, whose Linux x86_64
# wheels are CUDA builds, or from INDEX_URL (PyTorch's wheel index for your CUDA version, from
# its install page), ignoring this machine's local wheel directory and pip constraints.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH="${MINPRO_TORCH:-torch==2.13.0}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if [ "${1:-}" = "--cuda" ]; then
    index=()
    if [ -n "${2:-}" ]; then index=(--index-url "$2"); fi
    PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= .venv/bin/python -m pip install --quiet "${index[@]}" "$TORCH"
    .venv/bin/python -m pip install --quiet -e ".[test]"  # torch is there: nothing pulls another build
    .venv/bin/python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'devices', torch.cuda.device_count())"
else
    .venv/bin/python -m pip install --quiet "$TORCH" -e ".[test]"
fi
