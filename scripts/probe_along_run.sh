#!/usr/bin/env bash
# `minpro probe` along one on-policy run's checkpoints (one per optimizer step), rerun-safe:
#   bash scripts/probe_along_run.sh RECIPE RUN_DIR [TRAIN_OVERRIDE ...] -- PROBE_ARG ...
# trains RUN_DIR unless it finished (resuming an interrupted run), then writes RUN_DIR/probe.json
# and RUN_DIR/plots/ unless probe.json exists. Used by offpolicy_study.sh and arena.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
recipe=$1 run=$2
shift 2
train=()
while [ "$1" != "--" ]; do train+=("$1"); shift; done
shift
if [ ! -e "$run/final/.complete" ]; then
    .venv/bin/minpro train "$recipe" "run_dir=$run" train.checkpoint_every=1 "${train[@]}"
fi
if [ ! -e "$run/probe.json" ]; then
    .venv/bin/minpro probe "$recipe" --run "$run" "$@" --json "$run/probe.json" --plot "$run/plots"
fi
