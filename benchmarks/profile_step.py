"""Where one RL step's time goes: torch.profiler tables of generation and training.

The `vs_trl.py` workload (32 prompts x 8, <= 64 new tokens, T = 1) on one model, after one
warm-up step; prints the ops with the most self time in each phase, and the share of the
phase spent in matrix multiplies.

    .venv/bin/python benchmarks/profile_step.py [--model qwen2-4.5m|smollm2] [--compile] [--bf16] [--casts] [--prompts 32]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import GROUP_SIZE, MAX_NEW_TOKENS, N_PROMPTS
from vs_trl import LR, MINPRO_TOKENS, model_dir

from minpro_cli.config import recipe_from_data
from minpro_cli.console import console
from minpro_cli.modeling import compile_blocks, load_policy
from minpro_cli.sampling import Plugins, load_split, sample_rows, sampling_job
from minpro_cli.step import Trainee, training_batch, update_policy

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def table(prof: profile, title: str, seconds: float, weight_shapes: set[str] | None) -> None:
    """Top ops by self time, the matmuls' share, and with `weight_shapes` the dtype casts of
    weights (copies whose input has a weight's shape: autocast casting float32 weights, or their
    gradients back)."""
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMULS)
    casts = ""
    if weight_shapes is not None:
        seconds_cast = sum(e.self_cpu_time_total for e in prof.key_averages(group_by_input_shape=True)
                           if e.key == "aten::copy_" and e.input_shapes and str(e.input_shapes[0]) in weight_shapes)
        casts = f", weight casts {seconds_cast / 1e6:.2f} s ({seconds_cast / total:.1%})"
    print(f"\n{title}: {seconds:.2f} s, matrix multiplies {matmul / total:.0%} of op time{casts}")
    print(events.table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2-4.5m")
    parser.add_argument("--compile", action="store_true", help="train.compile=true")
    parser.add_argument("--bf16", action="store_true", help="bf16 sampling weights and bf16 autocast training")
    parser.add_argument("--casts", action="store_true",
                        help="also time autocast's weight casts (records every op's shapes: SmolLM2 runs out of 23 GB)")
    parser.add_argument("--prompts", type=int, default=N_PROMPTS)
    args = parser.parse_args()
    console.quiet = True
    directory, precision = str(model_dir(args.model)), "bfloat16" if args.bf16 else "float32"
    recipe = recipe_from_data({"model": {"path": directory, "dtype": precision}, "sampler": {"name": "hf", "options": {
        "max_new_tokens": MAX_NEW_TOKENS, "dtype": precision}},
        "train": {"micro_batch_tokens": MINPRO_TOKENS.get(args.model, 16384)}}, "profile")
    policy = load_policy(directory, precision)
    job, problems = sampling_job(recipe, policy, Plugins.of(recipe)), load_split(recipe, "train")[:args.prompts]
    objective, optimizer = recipe.plugin("objectives"), torch.optim.AdamW(policy.model.parameters(), lr=LR)
    if args.compile:
        compile_blocks(policy.model)
    trainee = Trainee.of(policy, recipe.train.micro_batch_tokens)
    for step in range(2):  # the first is the warm-up
        with profile(activities=[ProfilerActivity.CPU], record_shapes=args.casts) as sampling:
            started = time.perf_counter()
            rows, _ = sample_rows(job, problems, GROUP_SIZE, seed=step)
            batch = training_batch(rows, "grpo", False)
            generated = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=args.casts) as training:
            update_policy(trainee, optimizer, objective, batch, 1, 1, recipe.optim.grad_clip, seed=step)
            trained = time.perf_counter()
    shapes = {str(list(p.shape)) for p in policy.model.parameters() if p.dim() == 2} if args.casts else None
    table(sampling, "generation", generated - started, shapes)
    table(training, "training", trained - generated, shapes)


if __name__ == "__main__":
    main()
