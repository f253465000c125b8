"""The `vllm` sampler's two seed modes on one engine, interleaved: a seed per prompt against one
seed per call (vLLM's batched sampling path).

    bash scripts/setup_vllm.sh
    .venv/bin/python benchmarks/seed_modes.py [--model embedded|PATH] [--prompts 32] [--group 8] [--repeats 5]

Each mode gets an untimed warm-up call, then the calls alternate (the same prompts, seed 0):
min/median/max seconds and tokens/s. Reproducible: two calls with the same seed give the same
tokens. The last column is the largest gap between the recorded log μ and a transformers forward
pass over the same tokens (both modes must record the distribution they drew from).
"""

from __future__ import annotations

import time

import torch
from memory import spread
from minpro_vllm.sampler import VLLMSampler
from samplers import batch, logprob_gap, sampling_arguments

from minpro_cli.modeling import load_policy

MODES = ("prompt", "round")


def main() -> None:
    args = sampling_arguments(__doc__.splitlines()[0], repeats=5)
    policy = load_policy(args.model)
    prompts = batch(policy, args.prompts, args.group)
    context = min(1024, policy.model.config.max_position_embeddings)
    sampler = VLLMSampler(max_new_tokens=args.max_new_tokens, dtype="float32", max_model_len=context)
    seconds: dict[str, list[float]] = {m: [] for m in MODES}
    tokens: dict[str, list[list[int]]] = {}
    same: dict[str, bool] = {}
    gap: dict[str, float] = {}
    for mode in MODES:  # warm-up: the engine starts on the first
        sampler.seed_mode = mode
        first = sampler.generate(policy, prompts, seed=0)
        tokens[mode] = [g.token_ids for g in first]
        gap[mode] = logprob_gap(policy, prompts, first)
    for r in range(args.repeats):
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            sampler.seed_mode = mode
            started = time.perf_counter()
            out = sampler.generate(policy, prompts, seed=0)
            seconds[mode].append(time.perf_counter() - started)
            same[mode] = same.get(mode, True) and [g.token_ids for g in out] == tokens[mode]
    print(f"model {args.model}: {args.prompts} prompts × {args.group}, ≤ {args.max_new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads, {args.repeats} interleaved calls per mode\n")
    print("| seed_mode | seconds (min/median/max) | tokens/s (median) | same tokens for the same seed | max abs log-μ gap |")
    print("|---|---|---|---|---|")
    for mode in MODES:
        n_tokens = sum(len(t) for t in tokens[mode])
        median = sorted(seconds[mode])[len(seconds[mode]) // 2]
        print(f"| {mode} | {spread(seconds[mode], '.2f')} | {n_tokens / median:.0f} | {'yes' if same[mode] else 'no'} | "
              f"{gap[mode]:.1e} |")


if __name__ == "__main__":
    main()
