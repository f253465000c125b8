"""Build the `small-sums` task shipped in src/minpro_cli/assets/tasks/ (for real small models).

Every "What is a + b?" with 0 ≤ a, b ≤ 20 and every "What is a - b?" with 0 ≤ b ≤ a ≤ 20
(672 problems), shuffled with a fixed seed and split into 300 held-out problems and 372
training ones, disjoint. Deterministic: rerunning it rewrites the same files byte for byte.

    python scripts/build_small_sums_task.py

Why this task: SmolLM2-135M-Instruct, asked to "Give the final number after 'The answer is'",
gets about a third of these right at temperature 0.7 but states ~10% in that form, so RL has a
measurable gap to close within minutes of CPU time (docs/results/smollm2-rl.md).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TASKS = Path(__file__).resolve().parents[1] / "src" / "minpro_cli" / "assets" / "tasks"
LARGEST, N_TEST = 20, 300


def problems() -> list[dict[str, str]]:
    sums = [(f"What is {a} + {b}?", a + b) for a in range(LARGEST + 1) for b in range(LARGEST + 1)]
    differences = [(f"What is {a} - {b}?", a - b) for a in range(LARGEST + 1) for b in range(a + 1)]
    return [{"question": q, "answer": str(answer)} for q, answer in sums + differences]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=TASKS)
    args = parser.parse_args()
    rows = problems()
    random.Random(args.seed).shuffle(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    for split, part in (("test", rows[:N_TEST]), ("train", rows[N_TEST:])):
        with open(args.out / f"small-sums-{split}.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps({"id": f"small-sums-{split}-{i:04d}", **r}) + "\n" for i, r in enumerate(part))
    print(f"wrote {len(rows) - N_TEST} training and {N_TEST} held-out problems to {args.out}")


if __name__ == "__main__":
    main()
