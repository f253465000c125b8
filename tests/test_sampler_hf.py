"""The hf sampler: its log-probs are those of the distribution that drew each token."""

from __future__ import annotations

import math

import pytest
import torch

from minpro_cli.modeling import load_policy
from minpro_cli.samplers import hf, policy_logprobs
from minpro_cli.samplers.hf import HFSampler, inverse_cdf_draw, truncate_logits

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


def test_inverse_cdf_draw_by_hand():
    """p = (0.5, 0.3, 0, 0.2): C = (0.5, 0.8, 0.8, 1.0); u picks the first v with u < C_v."""
    logp = torch.log(torch.tensor([0.5, 0.3, 0.0, 0.2])).expand(6, 4)
    uniform = torch.tensor([0.0, 0.49, 0.5, 0.79, 0.8, 0.999])
    assert inverse_cdf_draw(logp, uniform).tolist() == [0, 0, 1, 1, 3, 3]  # token 2 (p = 0) never


def test_inverse_cdf_draw_never_picks_a_zero_probability_token_at_the_top_of_the_range():
    """At u = 1 (the closed end, which rounding of u·C_V can reach) the draw is the last token of
    positive probability, never a truncated token after it."""
    logp = torch.log_softmax(torch.tensor([[2.0, 0.5, 1.0, -math.inf, -math.inf]]), -1).expand(3, 5)
    uniform = torch.tensor([1.0, 1.0 - 2.0**-24, 0.0])
    assert inverse_cdf_draw(logp, uniform).tolist() == [2, 2, 0]


def test_inverse_cdf_draw_frequencies_match_the_probabilities():
    generator = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.05, 0.6, 0.0, 0.25, 0.1])
    n = 200_000
    draws = inverse_cdf_draw(probs.log().expand(n, 5), torch.rand(n, generator=generator))
    frequencies = torch.bincount(draws, minlength=5).double() / n
    # 5 standard errors of a binomial proportion at n = 200k: ≤ 0.0055
    assert (frequencies - probs.double()).abs().max() < 5 * math.sqrt(0.25 / n)
    assert frequencies[2] == 0


def test_dropping_ended_rows_changes_no_token_or_logprob(monkeypatch):
    """Rows leave the batch as they end (COMPACT_EVERY); each row keeps its own uniforms, so the
    samples equal those of a batch that never drops a row. Float64 weights: no near-ties; T = 2.5: the draws are far from deterministic."""
    policy = load_policy("embedded")  # its own copy: the shared fixture stays float32
    policy.model.double()
    prompts = encode(policy, PROMPTS) * 5
    compacted = HFSampler(temperature=2.5, max_new_tokens=50).generate(policy, prompts, seed=4)
    monkeypatch.setattr(hf, "COMPACT_EVERY", 0)  # 0 × ended ≥ rows never holds: nothing dropped
    full = HFSampler(temperature=2.5, max_new_tokens=50).generate(policy, prompts, seed=4)
    lengths = [len(g.token_ids) for g in full]
    assert min(lengths) < max(lengths)  # rows did end at different steps
    assert [g.token_ids for g in compacted] == [g.token_ids for g in full]
    for a, b in zip(compacted, full):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-9, rtol=0)
