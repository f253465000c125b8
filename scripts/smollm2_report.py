"""Write docs/results/smollm2-rl.md from a finished `scripts/smollm2_rl.sh` run directory.

    python scripts/smollm2_report.py runs/smollm2-rl --minutes 45 --out docs/results/smollm2-rl.md

Before/after held-out pass@1 with their standard errors (over problems), the change with the
standard error of the paired per-problem difference, the training curves (`minpro plot`),
and a few held-out responses before and after.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
from pathlib import Path

import pyarrow.parquet as pq
import torch


def per_problem(samples: Path) -> dict[str, float]:
    """Mean reward of each held-out problem's samples."""
    rewards: dict[str, list[float]] = {}
    for row in pq.read_table(samples, columns=["prompt_id", "reward"]).to_pylist():
        rewards.setdefault(row["prompt_id"], []).append(float(row["reward"]))
    return {k: statistics.fmean(v) for k, v in rewards.items()}


def examples(samples: Path, n: int) -> list[tuple[str, str, float]]:
    rows = pq.read_table(samples, columns=["prompt", "response", "reward", "sample_index"]).to_pylist()
    first = [r for r in rows if r["sample_index"] == 0][:n]
    return [(r["prompt"], r["response"], r["reward"]) for r in first]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--minutes", type=float, required=True, help="wall time of the whole command")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    run, out = args.run, args.out
    before, after = (json.loads((run / "eval" / f"{w}.json").read_text()) for w in ("before", "after"))
    b, a = (per_problem(run / "eval" / f"{w}.samples.parquet") for w in ("before", "after"))
    diffs = [a[k] - b[k] for k in b]
    paired_se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    unpaired_se = math.hypot(before["pass@1_stderr"], after["pass@1_stderr"])
    change = after["pass@1"] - before["pass@1"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    recipe = json.loads((run / "eval" / "after.json").read_text())["config"]
    figures = out.with_suffix("")
    figures.mkdir(parents=True, exist_ok=True)
    shutil.copy(run / "plots" / "training.png", figures / "training.png")
    train, objective = recipe["train"], recipe["objective"]
    device = recipe["model"]["device"]
    where = f"{os.cpu_count()} CPU cores" if device == "cpu" else f"a {torch.cuda.get_device_name()}"
    lines = [
        f"# SmolLM2-135M-Instruct learns small sums with MinPRO, on {where}",
        "",
        f"Made by `bash scripts/smollm2_rl.sh` in {args.minutes:.0f} minutes (install, eval, train, eval) on",
        f"{where}; this file is written by `scripts/smollm2_report.py`.",
        "",
        (f"| held-out ({after['n_problems']} problems × {after['n_samples']} samples, "
         f"T = {recipe['sampler']['options']['temperature']}) | pass@1 | s.e. |"),
        "|---|---|---|",
        f"| before (SmolLM2-135M-Instruct) | {before['pass@1']:.3f} | {before['pass@1_stderr']:.3f} |",
        f"| after {len(metrics)} rounds of {objective['name']} | {after['pass@1']:.3f} | {after['pass@1_stderr']:.3f} |",
        f"| change | **{change:+.3f}** | {paired_se:.3f} paired ({unpaired_se:.3f} unpaired) |",
        "",
        (f"The change is **{change / paired_se:.1f} standard errors** of the paired per-problem difference "
         f"({change / unpaired_se:.1f} of the unpaired one, which ignores that both evaluations use the same "
         "problems)."),
        f"pass@2: {before.get('pass@2', float('nan')):.3f} → {after.get('pass@2', float('nan')):.3f}.",
        "",
        "## Setup",
        "",
        "* Task: `embedded:small-sums-*` (`scripts/build_small_sums_task.py`): every `What is a + b?` and",
        "  `What is a - b?` with operands 0–20, 372 training and 300 disjoint held-out problems. The prompt",
        "  asks for \"the final number after 'The answer is'\"; the `math` verifier with `fallback: answer_is`",
        "  rewards exactly that (or a boxed number). The model knows much of the arithmetic but rarely",
        "  answers in the asked-for form: RL has to teach the form and keep the arithmetic.",
        (f"* Training: `recipes/smollm2-rl.yaml` — {train['iterations']} rounds × {train['prompts_per_iteration']} "
         f"prompts × {train['group_size']} samples, {train['minibatches']} optimizer steps per round, lr "
         f"{recipe['optim']['lr']} ({recipe['optim']['schedule']}), micro-batches of {train['micro_batch_tokens']} "
         f"tokens, activation checkpointing, {recipe['model']['dtype']} on {recipe['model']['device']}."),
        f"* Training reward {metrics[0]['reward_mean']:.3f} in the first round → {metrics[-1]['reward_mean']:.3f} in the last;",
        f"  mean response length {metrics[0]['response_length_mean']:.0f} → {metrics[-1]['response_length_mean']:.0f} tokens.",
        "",
        f"![training curves]({figures.name}/training.png)",
        "",
        "## Held-out responses, first sample of the first problems",
        "",
    ]
    for (prompt, old, r_old), (_, new, r_new) in zip(examples(run / "eval" / "before.samples.parquet", 4),
                                                    examples(run / "eval" / "after.samples.parquet", 4)):
        question = prompt.split("<|im_start|>user\n")[-1].split("<|im_end|>")[0]
        lines += [f"**{question}**", "", f"* before (reward {r_old:g}): `{old.strip()[:160]!s}`",
                  f"* after (reward {r_new:g}): `{new.strip()[:160]!s}`", ""]
    out.write_text("\n".join(lines))
    print(f"wrote {out}: pass@1 {before['pass@1']:.3f} → {after['pass@1']:.3f} ({change / paired_se:+.1f} s.e.)")


if __name__ == "__main__":
    main()
