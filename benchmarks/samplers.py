"""Rollout throughput: the `hf` sampler against the `vllm` sampler, same prompts and model, one run.

    bash scripts/setup_vllm.sh                       # .venv-vllm and the plugin
    .venv/bin/python benchmarks/samplers.py [--model embedded|PATH] [--prompts 32] [--group 8] [--max-new-tokens 64]

Each sampler gets one untimed warm-up call (vLLM starts its engine and compiles there), then
the median of `--repeats` timed calls. Peak memory is the maximum resident set (VmHWM) of
the processes that sample: this one for `hf` (measured in a fresh child), the vLLM worker
and the engine processes it starts for `vllm`. The last column is the largest gap between
the log-probs a sampler recorded and a transformers forward pass over the same tokens.
"""

from __future__ import annotations

import argparse

import torch
from common import measure, timed
from minpro_vllm.sampler import VLLMSampler
from proctree import status_bytes, tree

from minpro_cli.modeling import Policy, load_policy
from minpro_cli.samplers import Generation, policy_logprobs
from minpro_cli.samplers.hf import HFSampler
from minpro_cli.tasks import load_problems, render_prompt


def batch(policy: Policy, n_prompts: int, group: int) -> list[list[int]]:
    problems = load_problems("embedded:arith-train")[:n_prompts]
    texts = [render_prompt("Question: {question}\nAnswer:", p) for p in problems]
    return [policy.tokenizer.encode(t, add_special_tokens=False) for t in texts for _ in range(group)]


def logprob_gap(policy: Policy, prompts: list[list[int]], generations: list[Generation]) -> float:
    recomputed = policy_logprobs(policy, prompts, generations)
    return max(float((full - torch.tensor(g.logprobs)).abs().max()) for full, g in zip(recomputed, generations)
               if g.logprobs)


def process_tree_peak_mb(pid: int) -> float:
    """Sum of VmHWM over a process and its descendants (Linux)."""
    return sum(status_bytes(p, "VmHWM") for p in tree(pid)) / 2**20


def sampling_arguments(description: str, repeats: int) -> argparse.Namespace:
    """The model and the batch to sample: --model, --prompts, --group, --max-new-tokens, --repeats."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=repeats)
    return parser.parse_args()


def main() -> None:
    args = sampling_arguments(__doc__.splitlines()[0], repeats=2)
    policy = load_policy(args.model)
    prompts = batch(policy, args.prompts, args.group)
    hf = HFSampler(max_new_tokens=args.max_new_tokens, batch_size=len(prompts))
    context = min(1024, policy.model.config.max_position_embeddings)
    vllm = VLLMSampler(max_new_tokens=args.max_new_tokens, dtype="float32", max_model_len=context)
    rows = []

    def run_hf() -> tuple[float, int]:
        seconds, out = timed(lambda: hf.generate(policy, prompts, seed=0), repeats=args.repeats)
        return seconds, sum(len(g.token_ids) for g in out)

    hf_run = measure(run_hf)
    hf_gap = logprob_gap(policy, prompts, hf.generate(policy, prompts, seed=0))
    rows.append(("hf", hf_run.seconds, hf_run.tokens, hf_run.peak_mb, hf_gap))

    seconds, out = timed(lambda: vllm.generate(policy, prompts, seed=0), repeats=args.repeats)
    assert vllm._worker is not None
    peak = process_tree_peak_mb(vllm._worker.process.pid)
    rows.append(("vllm", seconds, sum(len(g.token_ids) for g in out), peak, logprob_gap(policy, prompts, out)))

    print(f"\nmodel {args.model}: {args.prompts} prompts × {args.group} samples, ≤ {args.max_new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads")
    print(f"{'sampler':8} {'seconds':>8} {'tokens':>7} {'tokens/s':>9} {'peak MB':>8} {'max |Δ log μ|':>14}")
    for name, secs, tokens, peak_mb, gap in rows:
        print(f"{name:8} {secs:8.2f} {tokens:7d} {tokens / secs:9.0f} {peak_mb:8.0f} {gap:14.2e}")
    print(f"vllm / hf tokens/s: {(rows[1][2] / rows[1][1]) / (rows[0][2] / rows[0][1]):.2f}×")


if __name__ == "__main__":
    main()
