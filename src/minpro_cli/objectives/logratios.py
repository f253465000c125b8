"""Token, minimum-prefix and cumulative-prefix ratios in log space (shared by objectives
and `inspect-ratios`). All functions ignore positions where `mask` is False."""

from __future__ import annotations

import torch

from minpro_cli.objectives import LOG_RATIO_CLAMP


def log_token_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor) -> torch.Tensor:
    """log ρ_t = log π_θ − log μ, clamped to ±20 (keeps grad through logprobs)."""
    return (logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def log_min_prefix_ratio(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log ρ̲_t = min_{i<t, mask_i} log ρ_i — strict: preceding tokens only, 0 for an empty prefix.

    Masked positions are +inf before the running minimum so they never win it.
    """
    masked = log_ratio.detach().masked_fill(~mask, float("inf"))
    running_min = torch.cummin(masked, dim=-1).values
    shifted = torch.cat([torch.full_like(running_min[:, :1], float("inf")), running_min[:, :-1]], dim=-1)
    return torch.where(torch.isinf(shifted), torch.zeros_like(shifted), shifted)


def log_prefix_ratio(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log ρ_{1:t} = Σ_{i≤t, mask_i} log ρ_i (inclusive cumulative product of token ratios)."""
    return (log_ratio.detach() * mask.to(log_ratio.dtype)).cumsum(dim=-1)
