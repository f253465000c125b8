#!/usr/bin/env bash
# The arena from a fresh clone (recipes/arena.yaml, the quickstart model):
#   1. a 40-step on-policy run with a checkpoint per step, and `minpro probe` of its last checkpoint
#      against the ones 0, 4 and 16 steps older, for every objective of the arena (3 draws);
#   2. the staleness sweep: every objective × staleness 0, 4, 16 × the recipe's seeds;
#   3. the CPPO paper's regime: every objective × 4 and 8 optimizer steps per rollout batch
#      (train.minibatches) at staleness 0;
#   4. the reports, each with its figures and the paired differences to MinPRO:
#      docs/results/arena.md (staleness, with the probe) and docs/results/arena-minibatches.md.
#   bash scripts/arena.sh            # the full arena
#   bash scripts/arena.sh --quick    # the smoke-sized version (minutes) → runs/arena-quick/
# Interrupt it any time: rerunning finishes only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
MINPRO=.venv/bin/minpro
RECIPE=recipes/arena.yaml
OBJECTIVES=()
for name in grpo gspo cispo m2po prefix minpro minpro:clip_mode=ppo ctpo ctpo_la pnpo cppo dppo_tv dppo_kl \
            gmpo ce_gppo topr gipo; do
    OBJECTIVES+=(--objective "$name")
done
MINIBATCHES=(--grid train.staleness=0 --grid train.minibatches=4,8)

if [ "${1:-}" = "--quick" ]; then
    SUFFIX=-quick
    QUICK=(--quick)
    STALENESS=0,3
    OBJECTIVES=(--objective grpo --objective minpro --objective ctpo --objective cppo)
    MINIBATCHES=(--grid train.staleness=0 --grid train.minibatches=4)
    REPORTS=runs/arena-quick
else
    SUFFIX=
    QUICK=()
    STALENESS=0,4,16
    REPORTS=docs/results
fi
PROBE_RUN=runs/arena-probe$SUFFIX
PROBE_JSON=$PROBE_RUN/probe.json

# 1. the probe, along one on-policy run's checkpoints (one per optimizer step)
bash scripts/probe_along_run.sh "${QUICK[@]}" "$RECIPE" "$PROBE_RUN" "$STALENESS" "${OBJECTIVES[@]}"

# 2. and 3. the sweeps; each skips its finished runs and resumes the others
$MINPRO sweep "$RECIPE" "${QUICK[@]}" --no-report
$MINPRO sweep "$RECIPE" "${MINIBATCHES[@]}" "${QUICK[@]}" --out "runs/arena-minibatches$SUFFIX" --no-report

# 4. the reports, with their figures next to them (and the reading written by hand, once there is one)
notes() { if [ -z "$SUFFIX" ] && [ -f "docs/results/$1.notes.md" ]; then echo "--notes=docs/results/$1.notes.md"; fi; }
$MINPRO report "runs/arena$SUFFIX" --out "$REPORTS/arena.md" --probe "$PROBE_JSON" $(notes arena)
$MINPRO report "runs/arena-minibatches$SUFFIX" --out "$REPORTS/arena-minibatches.md" $(notes arena-minibatches)
echo "reports: $REPORTS/arena.md, $REPORTS/arena-minibatches.md"
