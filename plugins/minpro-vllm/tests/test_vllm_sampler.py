"""The `vllm` sampler against a transformers forward pass on the same weights.

Opt-in: runs where the vllm environment exists (scripts/setup_vllm.sh makes .venv-vllm in the
repository root; or set MINPRO_VLLM_PYTHON). Tolerance: vLLM's CPU kernels compute the same
float32 model in another order, so per-token log-probs agree to ~1e-5; the test allows 1e-3
absolute, far below the gap a wrong temperature or stale weights make (≥ 0.05 here).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from minpro_vllm.sampler import PYTHON_ENV, VLLMSampler

from minpro_cli.modeling import load_policy
from minpro_cli.samplers import policy_logprobs

ROOT = Path(__file__).resolve().parents[3]
PYTHON = os.environ.get(PYTHON_ENV, str(ROOT / ".venv-vllm" / "bin" / "python"))
pytestmark = pytest.mark.skipif(not Path(PYTHON).is_file(), reason=f"no vllm environment at {PYTHON} (opt-in)")
TOLERANCE = 1e-3


def prompts(policy) -> list[list[int]]:
    questions = [f"Question: What is {a} + {b}?\nAnswer:" for a, b in [(3, 4), (12, 30), (7, 9), (41, 8)]]
    return [policy.tokenizer.encode(q, add_special_tokens=False) for q in questions for _ in range(2)]


def max_gap(policy, prompt_ids, generations, temperature: float) -> float:
    recomputed = policy_logprobs(policy, prompt_ids, generations, temperature)
    return max(float((full - torch.tensor(g.logprobs)).abs().max()) for full, g in zip(recomputed, generations))


@pytest.fixture(scope="module")
def sampler():
    return VLLMSampler(python=PYTHON, max_new_tokens=40, dtype="float32", max_model_len=256)


@pytest.fixture(scope="module")
def disk_sampler():
    return VLLMSampler(python=PYTHON, max_new_tokens=40, dtype="float32", max_model_len=256, transport="disk")


@pytest.mark.parametrize("transport", ["shm", "disk"])
def test_logprobs_match_transformers_and_follow_reloaded_weights(request, transport):
    sampler = request.getfixturevalue({"shm": "sampler", "disk": "disk_sampler"}[transport])
    policy = load_policy("embedded")
    ids = prompts(policy)
    first = sampler.generate(policy, ids, seed=1)
    # shared memory: the engine started from the config alone and took the weights from the segment
    assert (sampler._worker.weights / "model.safetensors").exists() == (transport == "disk")
    assert (sampler._worker.segment is not None) == (transport == "shm")
    assert len(first) == len(ids) and all(g.token_ids for g in first)
    assert any(g.token_ids[-1] == policy.eos_token_id and g.finish_reason == "stop" for g in first)
    assert max_gap(policy, ids, first, 1.0) < TOLERANCE
    assert first[0].token_ids != first[1].token_ids or first[2].token_ids != first[3].token_ids  # seeds differ

    with torch.no_grad():  # new weights: the next call must sample with them, not the old ones
        for p in policy.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    second = sampler.generate(policy, ids, seed=1)
    assert max_gap(policy, ids, second, 1.0) < TOLERANCE
    assert max_gap(load_policy("embedded"), ids, second, 1.0) > 50 * TOLERANCE


def test_temperature_is_applied_to_the_recorded_logprobs(sampler):
    policy = load_policy("embedded")
    ids = prompts(policy)
    hot = sampler.model_copy(update={"temperature": 0.7})
    hot._worker = sampler._worker  # same engine, other sampling options
    generations = hot.generate(policy, ids, seed=2)
    assert max_gap(policy, ids, generations, 0.7) < TOLERANCE
    assert max_gap(policy, ids, generations, 1.0) > 50 * TOLERANCE


def test_round_seeds_draw_each_prompt_anew_and_record_the_sampled_distribution(sampler):
    """seed_mode round: one seed for the engine's generator per call (vLLM's batched path). Not
    asserted: that a call repeats bit for bit — vLLM schedules requests as they reach its
    engine process, so a step's batch, and which draw a request gets, varies between calls."""
    policy = load_policy("embedded")
    ids = prompts(policy)
    batched = sampler.model_copy(update={"seed_mode": "round"})
    batched._worker = sampler._worker
    generations = batched.generate(policy, ids, seed=5)
    assert len({tuple(g.token_ids) for g in generations}) > len(ids) // 2  # not one draw repeated
    assert max_gap(policy, ids, generations, 1.0) < TOLERANCE
