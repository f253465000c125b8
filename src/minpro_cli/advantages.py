"""Outcome advantages from the rewards of a group of responses to one prompt.

Each estimator maps rewards r (N,) and a group index per response (N,) to Â (N,):

    grpo     Â_i = (r_i − mean_g r) / (std_g r + 1e-6)     std unbiased (GRPO, DeepSeekMath)
    dr_grpo  Â_i = r_i − mean_g r                         (Dr.GRPO: no std division)
    rloo     Â_i = r_i − mean_{j∈g, j≠i} r_j              (REINFORCE leave-one-out)

A group of one response has Â = 0 under every estimator.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from minpro_cli.objectives import AdvantageEstimator

GROUP_STD_EPS = 1e-6


def _n_groups(group: torch.Tensor) -> int:
    return int(group.max()) + 1 if group.numel() else 0


def _group_sum(values: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    return torch.zeros(_n_groups(group), dtype=values.dtype).index_add_(0, group, values)


def _group_count(rewards: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    return _group_sum(torch.ones_like(rewards), group)


def _centered(rewards: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    return rewards - (_group_sum(rewards, group) / _group_count(rewards, group))[group]


def grpo_advantages(rewards: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    centered = _centered(rewards, group)
    count = _group_count(rewards, group)
    std = (_group_sum(centered**2, group) / (count - 1).clamp(min=1)).sqrt()
    return centered / (std[group] + GROUP_STD_EPS)


def dr_grpo_advantages(rewards: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    return _centered(rewards, group)


def rloo_advantages(rewards: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    # r_i − (S − r_i)/(n − 1) = n/(n − 1) · (r_i − mean); 0 for a group of one
    count = _group_count(rewards, group)[group]
    return _centered(rewards, group) * count / (count - 1).clamp(min=1)


ESTIMATORS: dict[AdvantageEstimator, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
}


def compute_advantages(estimator: AdvantageEstimator, rewards: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    return ESTIMATORS[estimator](rewards, group)


def zero_variance_groups(rewards: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Bool per group: every response got the same reward, so the group carries no signal."""
    low = torch.full((_n_groups(group),), float("inf"), dtype=rewards.dtype).scatter_reduce(
        0, group, rewards, reduce="amin"
    )
    high = torch.full_like(low, float("-inf")).scatter_reduce(0, group, rewards, reduce="amax")
    return low == high


def group_indices(prompt_ids: list[str]) -> torch.Tensor:
    """Dense group index per row, in order of first appearance."""
    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(p, len(index)) for p in prompt_ids], dtype=torch.long)
