"""Advantage estimators and the unbiased pass@k estimator against independent computations."""

from __future__ import annotations

import itertools
import statistics

import pytest
import torch

from minpro_cli.advantages import (
    compute_advantages,
    dr_grpo_advantages,
    group_indices,
    grpo_advantages,
    rloo_advantages,
    zero_variance_groups,
)
from minpro_cli.eval import pass_at_k


def test_grpo_advantages_match_per_group_statistics():
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 0.5, 0.5, 0.5]
    prompts = ["a", "a", "a", "a", "b", "b", "c", "c"]
    adv = grpo_advantages(torch.tensor(rewards, dtype=torch.float64), group_indices(prompts)).tolist()
    group_a = rewards[:4]
    mu, sd = statistics.mean(group_a), statistics.stdev(group_a)
    assert adv[:4] == pytest.approx([(r - mu) / (sd + 1e-6) for r in group_a])
    sd_b = statistics.stdev(rewards[4:6])
    assert adv[4:6] == pytest.approx([0.25 / (sd_b + 1e-6), -0.25 / (sd_b + 1e-6)])
    assert adv[6:] == [0.0, 0.0]  # identical rewards: no signal


def test_dr_grpo_advantages_are_only_centered():
    adv = dr_grpo_advantages(torch.tensor([1.0, 0.0, 0.0]), group_indices(["a"] * 3))
    assert adv.tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3])


def test_rloo_subtracts_the_mean_of_the_other_responses():
    rewards = [1.0, 0.0, 0.5, 0.25, 3.0, 1.0, 7.0]
    prompts = ["a", "a", "a", "a", "b", "b", "c"]
    adv = rloo_advantages(torch.tensor(rewards, dtype=torch.float64), group_indices(prompts)).tolist()
    expected = []
    for i, (r, p) in enumerate(zip(rewards, prompts)):
        others = [rewards[j] for j in range(len(rewards)) if prompts[j] == p and j != i]
        expected.append(r - statistics.mean(others) if others else 0.0)
    assert adv == pytest.approx(expected)  # a group of one (c) has no baseline: 0


def test_estimators_by_name_and_zero_variance_groups():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    group = group_indices(["a", "a", "b", "b", "c", "c"])
    assert zero_variance_groups(rewards, group).tolist() == [True, False, True]
    for name, fn in [("grpo", grpo_advantages), ("dr_grpo", dr_grpo_advantages), ("rloo", rloo_advantages)]:
        adv = compute_advantages(name, rewards, group)
        assert torch.equal(adv, fn(rewards, group))
        assert adv[[0, 1, 4, 5]].abs().max() == 0.0  # equal rewards: no signal under any estimator


def test_group_indices_follow_first_appearance():
    assert group_indices(["x", "y", "x", "z"]).tolist() == [0, 1, 0, 2]


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 1, 6), (8, 3, 4), (7, 7, 2)])
def test_pass_at_k_equals_enumeration_over_subsets(n, c, k):
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    expected = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
