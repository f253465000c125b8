"""Advantage estimators, pass@k, maj@k, the standard error of pass@1 and eval comparison,
against independent computations."""

from __future__ import annotations

import itertools
import json
import math
import statistics
from fractions import Fraction

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
from minpro_cli.errors import MinproError
from minpro_cli.eval import compare_results
from minpro_cli.heldout import pass_at_k, score_groups
from minpro_cli.rollouts import RolloutRow


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


def sample(prompt: str, index: int, extracted: str | None, reward: float) -> RolloutRow:
    return RolloutRow(prompt, index, "", "", [], [], [], "", reward, "math", json.dumps({"extracted": extracted}),
                      "stop", 0, "m", "t", "hf", 1.0, 1.0, 0, 0)


def test_maj_at_k_and_standard_error_by_hand():
    rows = [
        sample("a", 0, "3", 1.0), sample("a", 1, "4", 0.0), sample("a", 2, "3", 1.0), sample("a", 3, "5", 0.0),
        sample("b", 0, "7", 0.0), sample("b", 1, "7", 0.0), sample("b", 2, "8", 1.0), sample("b", 3, None, 0.0),
        sample("c", 3, None, 0.0), sample("c", 0, None, 0.0), sample("c", 2, None, 0.0), sample("c", 1, None, 0.0),
    ]
    scores = score_groups(list(reversed(rows)), n=4, ks=[1, 2, 4])  # row order must not matter
    # maj@1: first sample right? a yes, b no, c none → 1/3; maj@2: a ties 3/4 → first seen "3" → 1/3
    # maj@4: a "3" wins (right), b "7" wins (wrong), c no answer → 1/3
    assert scores["maj@1"] == pytest.approx(1 / 3) and scores["maj@2"] == pytest.approx(1 / 3)
    assert scores["maj@4"] == pytest.approx(1 / 3)
    # per-problem pass@1: 0.5, 0.25, 0 → mean 0.25, sample std 0.25, stderr 0.25/√3
    assert scores["avg@n"] == pytest.approx(0.25)
    assert scores["pass@1_stderr"] == pytest.approx(0.25 / math.sqrt(3))
    assert scores["pass@4"] == pytest.approx((1 + 1 + 0) / 3)


@pytest.mark.parametrize("n,c,k", [(128, 0, 64), (128, 128, 1), (128, 1, 128), (128, 37, 16), (128, 90, 100)])
def test_pass_at_k_is_exact_for_large_n(n, c, k):
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)


def test_compare_prints_shared_metrics_and_names_bad_files(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"pass@1": 0.2, "pass@4": 0.5, "policy": "x", "n_problems": 10}))
    (tmp_path / "b.json").write_text(json.dumps({"pass@1": 0.3, "pass@4": 0.45, "policy": "y", "n_problems": 10}))
    shared = compare_results(tmp_path / "a.json", tmp_path / "b.json")
    assert shared == {"pass@1": (0.2, 0.3), "pass@4": (0.5, 0.45), "n_problems": (10.0, 10.0)}
    with pytest.raises(MinproError, match="eval result not found"):
        compare_results(tmp_path / "a.json", tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(MinproError, match=r"bad\.json: not an eval result"):
        compare_results(tmp_path / "bad.json", tmp_path / "a.json")
