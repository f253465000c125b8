"""Write the small data files of recipes/from-trl.yaml and recipes/from-verl.yaml, in TRL's and
verl's own layouts, from the embedded tasks (run from the repository root):

    python scripts/build_migration_examples.py

recipes/data/trl-arith.jsonl     TRL's standard prompt-only format: `prompt` (text), `solution`
recipes/data/verl-sums/          verl's RL parquet files: train.parquet and test.parquet with a
                                 chat `prompt`, `data_source`, `reward_model.ground_truth` and
                                 `extra_info.index`, as verl's examples/data_preprocess scripts write
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TASKS = Path("src/minpro_cli/assets/tasks")
OUT = Path("recipes/data")


def read(name: str, n: int) -> list[dict]:
    return [json.loads(line) for line in (TASKS / f"{name}.jsonl").read_text().splitlines()[:n]]


def verl_rows(rows: list[dict], split: str) -> list[dict]:
    return [{
        "data_source": "small-sums",
        "prompt": [{"role": "user", "content": f"{r['question']} Give the final number after 'The answer is'."}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": r["answer"]},
        "extra_info": {"split": split, "index": i},
    } for i, r in enumerate(rows)]  # fmt: skip


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    trl = [{"prompt": r["question"] + "\n", "solution": r["answer"]} for r in read("arith-train", 256)]
    (OUT / "trl-arith.jsonl").write_text("".join(json.dumps(r) + "\n" for r in trl))
    (OUT / "verl-sums").mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pylist(verl_rows(read("small-sums-train", 128), "train")), OUT / "verl-sums" / "train.parquet")
    pq.write_table(pa.Table.from_pylist(verl_rows(read("small-sums-test", 64), "test")), OUT / "verl-sums" / "test.parquet")


if __name__ == "__main__":
    main()
