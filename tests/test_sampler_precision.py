"""The hf sampler's own low-precision weights (`sampler.options.dtype`): one copy, cast once per
weights version, a KV cache in its precision, and recorded log μ that are those of the
distribution it drew from."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from minpro_cli.modeling import load_policy
from minpro_cli.samplers import hf, policy_logprobs
from minpro_cli.samplers.hf import HFSampler

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]] * 8


def gaps(reference: list[torch.Tensor], generations: list) -> torch.Tensor:
    return torch.cat([r - torch.tensor(g.logprobs) for r, g in zip(reference, generations)]).abs()


def nudge(model: torch.nn.Module, scale: float, seed: int) -> None:
    """Move every weight in place, as an optimizer step does."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_recorded_log_mu_is_the_sampled_distribution(dtype, temperature):
    """Replayed through the sampler's own decode (same weights, precision, batching and row
    drops, tokens forced), every recorded log μ comes back within 1e-4."""
    policy = load_policy("embedded")
    sampler = HFSampler(max_new_tokens=16, dtype=dtype, temperature=temperature, batch_size=16)
    generations = sampler.generate(policy, PROMPTS, seed=3)
    assert {g.finish_reason for g in generations} == {"stop", "length"}  # rows end early: compaction runs
    replayed = sampler.replay(policy, PROMPTS, [g.token_ids for g in generations])
    assert [r.token_ids for r in replayed] == [g.token_ids for g in generations]
    assert gaps([torch.tensor(r.logprobs) for r in replayed], generations).max() <= 1e-4


def test_a_bf16_sampler_records_its_own_weights_not_the_trainers():
    """An independent full forward of the bf16 copy is closer to the recorded log μ than the
    float32 trainer's forward; the two bf16 paths (cached decode, full forward) still differ by
    bf16 rounding of the activations (measured: mean 0.005, max 0.12 on the embedded model)."""
    policy = load_policy("embedded")
    sampler = HFSampler(max_new_tokens=40, dtype="bfloat16")
    generations = sampler.generate(policy, PROMPTS, seed=3)
    bf16 = dataclasses.replace(policy, model=sampler._copy[1], compute_dtype=torch.bfloat16)
    own, trainer = gaps(policy_logprobs(bf16, PROMPTS, generations), generations), gaps(
        policy_logprobs(policy, PROMPTS, generations), generations
    )
    assert own.mean() < 0.6 * trainer.mean() and own.mean() < 0.02
    assert 0 < trainer.mean() < 0.1  # bf16 rounding: a mismatch, never another policy


def test_the_copy_is_refreshed_exactly_when_the_weights_change(monkeypatch):
    policy = load_policy("embedded")
    sampler = HFSampler(max_new_tokens=8, dtype="bfloat16")
    reloads = []
    sampler.generate(policy, PROMPTS, seed=0)
    copied = sampler._copy[1]
    original = copied.load_state_dict
    monkeypatch.setattr(copied, "load_state_dict", lambda state: reloads.append(1) or original(state))

    def assert_holds(model: torch.nn.Module) -> None:
        for mine, theirs in zip(sampler._copy[1].parameters(), model.parameters()):
            assert mine.dtype == torch.bfloat16 and torch.equal(mine, theirs.detach().to(torch.bfloat16))

    sampler.generate(policy, PROMPTS, seed=1)
    assert reloads == [] and sampler._copy[1] is copied  # same version: no cast
    nudge(policy.model, 0.2, seed=0)
    sampler.generate(policy, PROMPTS, seed=2)
    assert len(reloads) == 1 and sampler._copy[1] is copied  # reloaded in place, not a second copy
    assert_holds(policy.model)
    stale = policy.copy()  # another model of the same shape (a staleness snapshot) reuses the copy
    nudge(stale.model, 0.2, seed=1)
    sampler.generate(stale, PROMPTS, seed=3)
    assert len(reloads) == 2 and sampler._copy[1] is copied
    assert_holds(stale.model)
    assert HFSampler.held_bytes(copied) == sum(p.numel() * 2 for p in policy.model.parameters()) + sum(
        b.numel() * b.element_size() for b in copied.buffers()
    )


def test_the_kv_cache_is_in_the_samplers_precision(monkeypatch):
    caches = []
    make = hf.preallocated_cache
    monkeypatch.setattr(hf, "preallocated_cache", lambda model, width: caches.append(make(model, width)) or caches[-1])
    HFSampler(max_new_tokens=4, dtype="bfloat16").generate(load_policy("embedded"), PROMPTS, seed=0)
    layers = caches[0].layers
    assert layers and all(layer.key_buffer.dtype == torch.bfloat16 for layer in layers)
