"""Rollout and training throughput of minpro on the embedded model, with peak memory.

Side by side in one run:
  * sampling: minpro's `hf` sampler (own KV-cache loop) vs transformers `model.generate`
    with the same settings (T = 1, top-k 0, top-p 1, logits returned for log-probs);
  * training: one forward + backward + AdamW step of the MinPRO objective over the batch.

Each figure is the median of 3 timed calls after a warm-up call.

    .venv/bin/python benchmarks/throughput.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import GROUP_SIZE, MAX_NEW_TOKENS, N_PROMPTS, measure, prompts, sampled_rows, timed

from minpro_cli.logprobs import pack
from minpro_cli.modeling import load_policy
from minpro_cli.objectives.minpro import MinPRO
from minpro_cli.samplers.hf import HFSampler
from minpro_cli.step import Trainee, training_batch, update_step


def minpro_sampling() -> tuple[float, int]:
    policy = load_policy("embedded")
    batch = prompts(policy)
    sampler = HFSampler(max_new_tokens=MAX_NEW_TOKENS, batch_size=len(batch))
    return timed(lambda: sum(len(g.token_ids) for g in sampler.generate(policy, batch, seed=0)))


def hf_generate_sampling() -> tuple[float, int]:
    policy = load_policy("embedded")
    batch = prompts(policy)
    packed = pack(batch, [[policy.pad_token_id]] * len(batch), policy.pad_token_id)
    width = max(len(p) for p in batch)
    ids, mask = packed.input_ids[:, :width], packed.attention_mask[:, :width]

    def run() -> int:
        torch.manual_seed(0)
        out = policy.model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
            max_new_tokens=MAX_NEW_TOKENS, output_logits=True, return_dict_in_generate=True,
            pad_token_id=policy.pad_token_id, eos_token_id=policy.eos_token_id,
        )
        logits = torch.stack(out.logits, dim=1)  # what a trainer needs for behaviour log-probs
        torch.log_softmax(logits.float(), dim=-1)
        new = out.sequences[:, width:]
        ended = (new == policy.eos_token_id).int().cumsum(-1)
        return int(((ended == 0) | ((ended == 1) & (new == policy.eos_token_id))).sum())

    return timed(run)


def minpro_training() -> tuple[float, int]:
    policy = load_policy("embedded")
    rows = sampled_rows(policy)
    rollout = training_batch(rows, "grpo", drop_zero_variance=False)
    assert rollout is not None
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=1e-5)
    policy.model.train()

    def step() -> int:
        update_step(Trainee.of(policy), optimizer, MinPRO(), rollout, 1.0)
        return sum(len(r.response_token_ids) for r in rows)

    return timed(step)


def main() -> None:
    print(f"embedded model, {N_PROMPTS} prompts x {GROUP_SIZE} samples, max {MAX_NEW_TOKENS} new tokens, "
          f"{torch.get_num_threads()} threads")
    rows = [
        ("sampling: minpro hf sampler", measure(minpro_sampling)),
        ("sampling: transformers generate", measure(hf_generate_sampling)),
        ("training: MinPRO fwd+bwd+AdamW", measure(minpro_training)),
    ]
    print(f"{'phase':36s} {'seconds':>8s} {'tokens':>8s} {'tokens/s':>10s} {'peak MB':>9s}")
    for name, m in rows:
        print(f"{name:36s} {m.seconds:8.2f} {m.tokens:8d} {m.tokens_per_s:10.0f} {m.peak_mb:9.0f}")
    print(f"minpro sampler speed-up over generate: {rows[0][1].tokens_per_s / rows[1][1].tokens_per_s:.2f}x")


if __name__ == "__main__":
    main()
