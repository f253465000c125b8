"""Responses written by several policies (train.partial_rollout): the hf sampler switches weights
mid-response, each token's log μ is that of its own version's weights, and the rows say which
version drew each token."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from minpro_cli.rollouts import read_rollout_rows
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


def test_a_partial_rollout_run_stamps_each_tokens_version_counts_staleness_and_pipelines_bit_for_bit(tmp_path):
    """Staleness 2, switches at tokens 3 and 6, one optimizer step per round: round r's tokens
    come from the weights of rounds r−2, r−1 and r (steps r−2, r−1, r, never before 0). The
    staleness metrics equal a count made from the files; the pipelined twin is the same run."""
    from test_pipeline import recipe

    from minpro_cli.train import run_train

    runs = {}
    for mode in ("false", "true"):
        final = run_train(recipe(tmp_path / mode, "train.staleness=2", "train.iterations=4", "train.minibatches=1",
                                 "train.partial_rollout={switch_at: [3, 6]}", f"train.pipeline={mode}"))  # fmt: skip
        metrics = [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
        rows = [read_rollout_rows(tmp_path / mode / "rollouts" / f"round_{r:05d}.parquet") for r in range(4)]
        runs[mode] = (load_file(str(final / "model.safetensors")), metrics, rows)
    weights, metrics, rounds = runs["false"]
    expected_sources = {0: (0, 0, 0), 1: (0, 0, 1), 2: (0, 1, 2), 3: (1, 2, 3)}  # the round's weights at 0, 3, 6
    for r, rows in enumerate(rounds):
        assert [m["step"] for m in metrics][r] == r + 1
        for row in rows:
            n = len(row.response_token_ids)
            by_token = [expected_sources[r][0]] * min(n, 3) + [expected_sources[r][1]] * max(0, min(n, 6) - 3) \
                + [expected_sources[r][2]] * max(0, n - 6)  # fmt: skip
            assert row.behavior_versions == by_token and row.policy_version == by_token[0]
        ages = [r - v for row in rows for v in row.behavior_versions]  # round r trains the weights of step r
        record = metrics[r]
        assert record["staleness/token_mean"] == pytest.approx(sum(ages) / len(ages), abs=1e-9)
        assert (record["staleness/oldest"], record["staleness/newest"]) == (max(ages), min(ages))
        assert record["spans"] == pytest.approx(sum(len(set(row.behavior_versions)) for row in rows) / len(rows))
    assert max(m["spans"] for m in metrics) > 2  # three versions wrote some responses
    weights_p, metrics_p, rounds_p = runs["true"]
    assert all(torch.equal(weights[k], weights_p[k]) for k in weights)
    assert [{k: v for k, v in m.items() if k != "time_s"} for m in metrics] == [
        {k: v for k, v in m.items() if k != "time_s"} for m in metrics_p
    ]
    assert rounds == rounds_p
