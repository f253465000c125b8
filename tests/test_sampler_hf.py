"""The hf sampler: its log-probs are those of the distribution that drew each token."""

from __future__ import annotations

import math

import pytest
import torch

from minpro_cli.samplers import policy_logprobs
from minpro_cli.samplers.hf import HFSampler, truncate_logits

PROMPTS = ["Compute 12+7-3.\n", "Compute 5-9.\n", "Compute 40+1+2-8.\n"]


def encode(policy, texts):
    return [policy.tokenizer.encode(t, add_special_tokens=False) for t in texts]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_a_forward_pass_of_the_same_weights(policy, temperature):
    prompts = encode(policy, PROMPTS) * 4
    gens = HFSampler(temperature=temperature, max_new_tokens=40).generate(policy, prompts, seed=3)
    recomputed = policy_logprobs(policy, prompts, gens, temperature)
    # fp32 logit noise between the cached and the full forward is scaled by 1/T
    tolerance = 1e-4 / min(temperature, 1.0)
    for full, g in zip(recomputed, gens):
        assert len(g.logprobs) == len(g.token_ids)
        torch.testing.assert_close(full, torch.tensor(g.logprobs), atol=tolerance, rtol=0)


def test_response_ends_at_the_first_eos(policy):
    gens = HFSampler(max_new_tokens=60).generate(policy, encode(policy, PROMPTS) * 3, seed=0)
    eos = policy.eos_token_id
    for g in gens:
        if g.finish_reason == "stop":
            assert g.token_ids[-1] == eos and eos not in g.token_ids[:-1]
        else:
            assert eos not in g.token_ids and len(g.token_ids) == 60


def test_length_limit_sets_finish_reason(policy):
    gens = HFSampler(max_new_tokens=3).generate(policy, encode(policy, PROMPTS), seed=0)
    assert all(g.finish_reason == "length" and len(g.token_ids) == 3 for g in gens)


def test_same_seed_same_samples_and_batching_does_not_matter_for_determinism(policy):
    prompts = encode(policy, PROMPTS)
    a = HFSampler(batch_size=8).generate(policy, prompts, seed=11)
    b = HFSampler(batch_size=8).generate(policy, prompts, seed=11)
    c = HFSampler(batch_size=8).generate(policy, prompts, seed=12)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]


def test_top_k_and_top_p_truncation_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    top2 = truncate_logits(logits, top_k=2, top_p=1.0)
    assert torch.isinf(top2[0, 2:]).all() and torch.isfinite(top2[0, :2]).all()
    nucleus = truncate_logits(logits, top_k=0, top_p=0.8)  # 0.5 + 0.3 reaches 0.8: keep two
    assert torch.isfinite(nucleus[0, :2]).all() and torch.isinf(nucleus[0, 2:]).all()
    wider = truncate_logits(logits, top_k=0, top_p=0.81)  # needs the third token too
    assert torch.isfinite(wider[0, :3]).all() and torch.isinf(wider[0, 3])


def test_truncated_sampling_records_renormalised_logprobs(policy):
    """With top-k the recorded μ is the renormalised one: above the untruncated log-prob."""
    prompts = encode(policy, PROMPTS)
    gens = HFSampler(top_k=2, max_new_tokens=20).generate(policy, prompts, seed=5)
    for full, g in zip(policy_logprobs(policy, prompts, gens), gens):
        recorded = torch.tensor(g.logprobs)
        assert (recorded >= full - 1e-5).all()
        assert all(lp <= 1e-6 and math.isfinite(lp) for lp in g.logprobs)
