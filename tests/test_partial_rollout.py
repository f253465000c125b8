"""Responses written by several policies (train.partial_rollout): the hf sampler switches weights
mid-response, each token's log μ is that of its own version's weights, and the rows say which
version drew each token."""

from __future__ import annotations

import pytest
import torch

from minpro_cli.samplers import WeightSwitch, policy_logprobs
from minpro_cli.samplers.hf import HFSampler

PROMPTS = ["Compute 12+7-3.\n", "Compute 5-9.\n", "Compute 40+1+2-8.\n"]
SWITCH = 5  # the token where the weights change


@pytest.fixture(scope="module")
def two_versions(policy):
    """The embedded policy's weights (version A) and a perturbed copy of them (version B)."""
    generator = torch.Generator().manual_seed(0)
    newer = {k: v + 0.03 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
             for k, v in policy.model.state_dict().items()}  # fmt: skip
    return {k: v.clone() for k, v in policy.model.state_dict().items()}, newer


def switching(sampling, weights_a, weights_b, at=SWITCH):
    return [WeightSwitch(0, lambda: sampling.model.load_state_dict(weights_a)),
            WeightSwitch(at, lambda: sampling.model.load_state_dict(weights_b))]  # fmt: skip


@pytest.mark.parametrize("batch_size", [256, 5])  # one batch, and several (each replays the switches)
def test_each_tokens_logprob_is_a_forward_of_its_own_versions_weights(policy, two_versions, batch_size):
    weights_a, weights_b = two_versions
    sampling = policy.copy()
    prompts = [policy.tokenizer.encode(t, add_special_tokens=False) for t in PROMPTS] * 4
    sampler = HFSampler(max_new_tokens=30, batch_size=batch_size)
    gens = sampler.generate(sampling, prompts, seed=3, switches=switching(sampling, weights_a, weights_b))
    sampling.model.load_state_dict(weights_a)
    under_a = policy_logprobs(sampling, prompts, gens)
    sampling.model.load_state_dict(weights_b)
    under_b = policy_logprobs(sampling, prompts, gens)
    switched = [g for g in gens if len(g.token_ids) > SWITCH]
    assert len(switched) >= len(gens) // 2  # most responses cross the switch
    gap = max((a[SWITCH:] - b[SWITCH:]).abs().max().item() for a, b, g in zip(under_a, under_b, gens)
              if len(g.token_ids) > SWITCH)  # fmt: skip
    assert gap > 1e-2  # the two versions differ enough for the check below to tell them apart
    for g, a, b in zip(gens, under_a, under_b):
        recorded = torch.tensor(g.logprobs)
        torch.testing.assert_close(recorded[:SWITCH], a[:SWITCH], atol=1e-4, rtol=0)
        torch.testing.assert_close(recorded[SWITCH:], b[SWITCH:], atol=1e-4, rtol=0)


def test_tokens_before_the_switch_are_those_drawn_without_one(policy, two_versions):
    weights_a, weights_b = two_versions
    sampling = policy.copy()
    prompts = [policy.tokenizer.encode(t, add_special_tokens=False) for t in PROMPTS] * 2
    sampler = HFSampler(max_new_tokens=20)
    sampling.model.load_state_dict(weights_a)
    plain = sampler.generate(sampling, prompts, seed=9)
    switched = sampler.generate(sampling, prompts, seed=9, switches=switching(sampling, weights_a, weights_b))
    again = sampler.generate(sampling, prompts, seed=9, switches=switching(sampling, weights_a, weights_b))
    assert [g.token_ids[:SWITCH] for g in switched] == [g.token_ids[:SWITCH] for g in plain]
    assert [g.token_ids for g in switched] == [g.token_ids for g in again]  # reproducible for a seed
    assert [g.token_ids for g in switched] != [g.token_ids for g in plain]
