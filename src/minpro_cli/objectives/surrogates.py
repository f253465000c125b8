"""The two per-token surrogates every built-in objective is made of, and their metrics.

* PPO-clip:         ℓ_t = max(−A_t·r_t, −A_t·clip(r_t, 1 − ε_low, 1 + ε_high))   (grad through r_t)
* detached weight:  ℓ_t = −sg[clip(w_t, 1 − ε_low, 1 + ε_high)]·A_t·log π_θ(o_t)  (CISPO-style)

The objectives differ only in the ratio they feed in (token, min-prefix, prefix, sequence).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import Field

from minpro_cli.objectives import Objective, masked_fraction, masked_mean, masked_min


class ClippedObjective(Objective):
    """Options of an objective with a clip interval [1 − eps_low, 1 + eps_high].

    eps_low ≥ 1 puts the lower bound at or below 0, i.e. no lower clipping of a ratio. TRL's
    absolute cap `min(r, ε_max)` (its `cispo` loss) is eps_low ≥ 1, eps_high = ε_max − 1.
    """

    eps_low: float = Field(0.2, ge=0.0, description="lower clip bound 1 − eps_low (≥ 1: none)")
    eps_high: float = Field(0.2, ge=0.0, description="upper clip bound 1 + eps_high")

    @property
    def clip_low(self) -> float:
        return 1.0 - self.eps_low

    @property
    def clip_high(self) -> float:
        return 1.0 + self.eps_high


@dataclass(frozen=True)
class Clipping:
    """Where a surrogate's clip took effect, per token (bool tensors)."""

    low: torch.Tensor
    high: torch.Tensor

    def metrics(self, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "clip_frac_low": masked_fraction(self.low, mask),
            "clip_frac_high": masked_fraction(self.high, mask),
            "clip_frac": masked_fraction(self.low | self.high, mask),
        }


def ppo_clip_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, low: float | torch.Tensor, high: float | torch.Tensor,
    dual_clip: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, Clipping]:  # fmt: skip
    """ℓ_t = max(−A_t·r_t, −A_t·clip(r_t, low, high)); with dual clip c, ℓ_t = min(ℓ_t, −A_t·c) where A_t < 0.
    The bounds may be per-token tensors (CTPO-LA's band widens with position).

    A token counts as clipped where the clip zeroes its gradient: r_t > high with A_t > 0,
    r_t < low with A_t < 0, or (dual clip, counted as high) r_t > c with A_t < 0. At a bound
    the gradient flows.
    """
    per_token = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(low, high))
    ratio_, negative = ratio.detach(), advantages < 0
    high_mask = (ratio_ > high) & (advantages > 0)
    low_mask = (ratio_ < low) & negative
    if dual_clip is not None:
        per_token = torch.where(negative, torch.minimum(per_token, -advantages * dual_clip), per_token)
        high_mask = high_mask | (negative & (ratio_ > dual_clip))
    return per_token, Clipping(low_mask, high_mask)


def detached_weight_surrogate(
    weight: torch.Tensor, advantages: torch.Tensor, logprobs: torch.Tensor, low: float, high: float
) -> tuple[torch.Tensor, torch.Tensor, Clipping]:
    """ℓ_t = −sg[clip(w_t, low, high)]·A_t·log π_θ(o_t); returns ℓ, the clipped weight and where it was clipped.

    Clipping never zeroes a token's gradient here: a clipped token still moves log π_θ, with
    the bound as its weight.
    """
    raw = weight.detach()
    clipped = raw.clamp(low, high)
    per_token = -clipped * advantages * logprobs
    return per_token, clipped, Clipping(raw < low, raw > high)


def ratio_metrics(log_ratio: torch.Tensor, mask: torch.Tensor, name: str = "ratio") -> dict[str, torch.Tensor]:
    """Mean, min and max of exp(log_ratio) over the trained tokens."""
    values = log_ratio.detach().exp()
    return {
        f"{name}_mean": masked_mean(values, mask),
        f"{name}_min": masked_min(values, mask),
        f"{name}_max": -masked_min(-values, mask),
    }
