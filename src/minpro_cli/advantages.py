"""Outcome advantages computed from the rewards of a group of responses to one prompt."""

from __future__ import annotations

import torch


def grpo_advantages(rewards: torch.Tensor, group: torch.Tensor, normalize_std: bool = True) -> torch.Tensor:
    """Â_i = (r_i − mean_{g(i)} r) / (std_{g(i)} r + 1e-6)   (GRPO; std is the unbiased one).

    With `normalize_std=False` it is r_i − mean_{g(i)} r (Dr.GRPO). `group` holds a group
    index per response; a group of one response has advantage 0.
    """
    n_groups = int(group.max()) + 1 if group.numel() else 0
    count = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, group, torch.ones_like(rewards))
    mean = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, group, rewards) / count
    centered = rewards - mean[group]
    if not normalize_std:
        return centered
    sq = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, group, centered**2)
    std = (sq / (count - 1).clamp(min=1)).sqrt()
    return centered / (std[group] + 1e-6)


def group_indices(prompt_ids: list[str]) -> torch.Tensor:
    """Dense group index per row, in order of first appearance."""
    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(p, len(index)) for p in prompt_ids], dtype=torch.long)
