#!/usr/bin/env bash
# `minpro probe` along one on-policy run's checkpoints (one per optimizer step), rerun-safe:
#   bash scripts/probe_along_run.sh [--quick] RECIPE RUN_DIR STALENESS OBJECTIVE_ARG ...
# trains RUN_DIR for 40 steps (--quick: 4, on 16 prompts) unless it finished, resuming an
# interrupted run, then writes RUN_DIR/probe.json and RUN_DIR/plots/ for the comma-separated
# STALENESS levels (3 draws, g★ from 16× the samples; --quick: 2 draws of 8 prompts, 2×) unless
# probe.json exists. Used by offpolicy_study.sh and arena.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$1" = "--quick" ]; then
    shift
    train=(train.iterations=4 train.keep_checkpoints=5 train.eval_every=4 train.prompts_per_iteration=16
           eval.max_problems=32)
    probe=(--draws 2 --prompts 8 --reference-multiple 2)
else
    train=(train.iterations=40 train.keep_checkpoints=41 train.eval_every=40)
    probe=(--draws 3 --reference-multiple 16)
fi
recipe=$1 run=$2 staleness=$3
shift 3
if [ ! -e "$run/final/.complete" ]; then
    .venv/bin/minpro train "$recipe" "run_dir=$run" train.checkpoint_every=1 "${train[@]}"
fi
if [ ! -e "$run/probe.json" ]; then
    .venv/bin/minpro probe "$recipe" --run "$run" --staleness "$staleness" "${probe[@]}" "$@" \
        --json "$run/probe.json" --plot "$run/plots"
fi
