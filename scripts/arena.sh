#!/usr/bin/env bash
# The arena from a fresh clone (recipes/arena.yaml, the quickstart model):
#   1. a 40-step on-policy run with a checkpoint per step, and `minpro probe` of its last checkpoint
#      against the ones 0, 4 and 16 steps older, for every objective of the arena (3 draws);
#   2. staleness: every objective × staleness 4 (--full: 0, 4, 16) × 3 seeds;
#   3. the CPPO paper's regime: every objective × 4 optimizer steps per rollout batch
#      (train.minibatches; --full: 4 and 8) at staleness 0 × 3 seeds;
#   4. the correction layer: MinPRO at staleness 4 with the round_start anchor (verl's decoupled
#      mode: the objective's ratio sees no staleness) and the staleness left uncorrected or
#      corrected by token TIS, the prefix minimum or the prefix product (correction.level) × 3 seeds;
#   5. the reports, each with its figures and the paired differences to MinPRO:
#      docs/results/arena.md (staleness, with the probe), docs/results/arena-minibatches.md and
#      docs/results/arena-anchors.md.
#   bash scripts/arena.sh            # the arena: 90–150 minutes on 2 cores (AVX-512 / AVX2)
#   bash scripts/arena.sh --full     # the whole grid of off-policyness: about 6 hours
#   bash scripts/arena.sh --quick    # the smoke-sized version (minutes) → runs/arena-quick/
# Interrupt it any time: rerunning finishes only what is missing. Each finished run leaves its
# record (and the probe its results) under docs/results/arena*/: commit them, and a rerun on
# another machine trains only the runs without one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
MINPRO=.venv/bin/minpro
RECIPE=recipes/arena.yaml
OBJECTIVES=()
for name in grpo gspo cispo m2po prefix minpro minpro:clip_mode=ppo ctpo ctpo_la pnpo cppo dppo_tv dppo_kl \
            gmpo ce_gppo topr gipo sapo; do
    OBJECTIVES+=(--objective "$name")
done
STALENESS_GRID=()
MINIBATCHES=(--grid train.staleness=0 --grid train.minibatches=4)
# the round_start anchor takes the staleness out of the objective's ratio (1 at a round's one
# step, so every objective reduces to the policy gradient: MinPRO alone stands for them) and the
# correction's level decides how it comes back: not at all, token TIS, MinPRO's prefix minimum, or
# the exact prefix product
ANCHORS=(--grid "objective={name: minpro}" --grid train.staleness=4 --grid train.anchor=round_start
         --grid correction.level=null,token,prefix_min,prefix)
SUFFIX=
QUICK=()
STALENESS=0,4,16
REPORTS=docs/results
case "${1:-}" in
    --quick)
        SUFFIX=-quick
        QUICK=(--quick)
        STALENESS=0,3
        OBJECTIVES=(--objective grpo --objective minpro --objective ctpo --objective cppo)
        REPORTS=runs/arena-quick ;;
    --full)
        STALENESS_GRID=(--grid train.staleness=0,4,16)
        MINIBATCHES=(--grid train.staleness=0 --grid train.minibatches=4,8) ;;
    "") ;;
    *) echo "usage: bash scripts/arena.sh [--quick | --full]" >&2; exit 2 ;;
esac
PROBE_RUN=runs/arena-probe$SUFFIX
if [ -z "$SUFFIX" ]; then  # the full arena keeps what it measured where git sees it
    PROBE_JSON=docs/results/arena/probe.json
    RECORDS=(--records docs/results/arena/records)
    MINIBATCH_RECORDS=(--records docs/results/arena-minibatches/records)
    ANCHOR_RECORDS=(--records docs/results/arena-anchors/records)
else
    PROBE_JSON=$PROBE_RUN/probe.json
    RECORDS=()
    MINIBATCH_RECORDS=()
    ANCHOR_RECORDS=()
fi

# 1. the probe, along one on-policy run's checkpoints (one per optimizer step); redone whole when
#    the arena has gained an objective since (same seeds: the others' numbers move only by the CPU's
#    rounding, ≤ 0.007 in cosine between an AVX2 and an AVX-512 EPYC)
missing=$(.venv/bin/python - "$PROBE_JSON" "${OBJECTIVES[@]}" <<'PY'
import json, sys
from pathlib import Path
path, wanted = Path(sys.argv[1]), set(sys.argv[2:][1::2])
probed = {c["objective"] for c in json.loads(path.read_text())["results"]} if path.exists() else set()
print(" ".join(sorted(wanted - probed)) if probed else "")
PY
)
if [ -n "$missing" ]; then
    echo "the probe lacks $missing: probing again"
    rm -f "$PROBE_JSON" "$PROBE_RUN/probe.json"
fi
if [ ! -e "$PROBE_JSON" ]; then
    bash scripts/probe_along_run.sh "${QUICK[@]}" "$RECIPE" "$PROBE_RUN" "$STALENESS" "${OBJECTIVES[@]}"
    mkdir -p "$(dirname "$PROBE_JSON")"
    [ "$PROBE_RUN/probe.json" -ef "$PROBE_JSON" ] || cp "$PROBE_RUN/probe.json" "$PROBE_JSON"  # --quick keeps it in place
fi

# 2., 3. and 4. the sweeps; each skips its finished (or recorded) runs and resumes the others
$MINPRO sweep "$RECIPE" "${STALENESS_GRID[@]}" "${QUICK[@]}" "${RECORDS[@]}" --no-report
$MINPRO sweep "$RECIPE" "${MINIBATCHES[@]}" "${QUICK[@]}" "${MINIBATCH_RECORDS[@]}" \
    --out "runs/arena-minibatches$SUFFIX" --no-report
$MINPRO sweep "$RECIPE" "${ANCHORS[@]}" "${QUICK[@]}" "${ANCHOR_RECORDS[@]}" \
    --out "runs/arena-anchors$SUFFIX" --no-report

# 5. the reports, with their figures next to them (and the reading written by hand, once there is one)
notes() { if [ -z "$SUFFIX" ] && [ -f "docs/results/$1.notes.md" ]; then echo "--notes=docs/results/$1.notes.md"; fi; }
$MINPRO report "runs/arena$SUFFIX" --out "$REPORTS/arena.md" --probe "$PROBE_JSON" $(notes arena)
$MINPRO report "runs/arena-minibatches$SUFFIX" --out "$REPORTS/arena-minibatches.md" $(notes arena-minibatches)
$MINPRO report "runs/arena-anchors$SUFFIX" --out "$REPORTS/arena-anchors.md" --line correction.level \
    --reference prefix_min $(notes arena-anchors)
echo "reports: $REPORTS/arena.md, $REPORTS/arena-minibatches.md, $REPORTS/arena-anchors.md"
