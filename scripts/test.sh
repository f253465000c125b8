#!/usr/bin/env bash
# Install everything, then run the test suite (pytest exits non-zero on any failure and on
# "no tests collected").
#
# One pytest worker per core (at most 4; MINPRO_TEST_WORKERS overrides, 0 runs in-process), each
# on one thread: the suite's models are small enough that a second thread gains little, while a
# second worker takes the interpreter, tokenizer and subprocess start-ups off the critical path.
# A test module stays on one worker (--dist loadfile), so module fixtures are built once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cores="$(nproc 2>/dev/null || echo 1)"
workers="${MINPRO_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}"
if [ "$workers" -gt 1 ]; then
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    parallel=(-n "$workers" --dist loadfile)
else
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
    parallel=()
fi
.venv/bin/python -m pytest -q -p no:cacheprovider "${parallel[@]}" "$@"
