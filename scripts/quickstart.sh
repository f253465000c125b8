#!/usr/bin/env bash
# The main job from a fresh clone: install, then rollout → train → eval on the embedded model,
# printing held-out pass@1 before and after training.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
RECIPE=recipes/quickstart.yaml
RUN=runs/quickstart
MINPRO=.venv/bin/minpro

$MINPRO rollout "$RECIPE" "run_dir=$RUN"
$MINPRO eval "$RECIPE" "run_dir=$RUN" --policy embedded --output "$RUN/eval/before.json"
$MINPRO train "$RECIPE" "run_dir=$RUN"
$MINPRO eval "$RECIPE" "run_dir=$RUN" --policy "$RUN/final" --output "$RUN/eval/after.json"
$MINPRO inspect-ratios "$RUN/rollouts" --policy "$RUN/final" --json "$RUN/ratios.json" --plot "$RUN/plots"
$MINPRO plot "$RUN"

.venv/bin/python - "$RUN" <<'PY'
import json, sys
run = sys.argv[1]
before = json.load(open(f"{run}/eval/before.json"))
after = json.load(open(f"{run}/eval/after.json"))
print(f"\nheld-out pass@1 ({after['n_problems']} problems x {after['n_samples']} samples):"
      f" before {before['pass@1']:.3f} -> after {after['pass@1']:.3f}")
PY
