#!/usr/bin/env bash
# The off-policy study from a fresh clone: install, train every (objective, staleness, seed) run
# of recipes/offpolicy-sweep.yaml two at a time, and write the report with its figures.
#   bash scripts/offpolicy_sweep.sh            # the whole study → docs/results/offpolicy-embedded.md
#   bash scripts/offpolicy_sweep.sh --quick    # the smoke-sized version → runs/offpolicy-sweep-quick/report.md
# Interrupt it any time: rerunning finishes only the runs that are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MINPRO=.venv/bin/minpro
RECIPE=recipes/offpolicy-sweep.yaml
if [ "${1:-}" = "--quick" ]; then
    $MINPRO sweep "$RECIPE" --quick
else
    $MINPRO sweep "$RECIPE" --no-report
    $MINPRO report runs/offpolicy-sweep --out docs/results/offpolicy-embedded.md \
        --notes docs/results/offpolicy-embedded.notes.md
fi
