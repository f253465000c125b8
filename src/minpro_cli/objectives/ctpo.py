"""CTPO (arXiv 2605.07331), its length-adaptive clip CTPO-LA, and PNPO (arXiv 2608.01418):
the prefix's ratio inside a PPO surrogate, as the CTPO authors' code computes it
(horizon-llm/CTPO, verl/trainer/ppo/core_algos.py, loss modes `cum-token-cumprod[-la]` and
`cum-token-geomean`)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from minpro_cli.objectives import Objective, ObjectiveInputs, ObjectiveOutput, masked_fraction
from minpro_cli.objectives.logratios import log_token_ratio
from minpro_cli.objectives.surrogates import ClippedObjective, ppo_clip_surrogate, ratio_metrics

LOG_WEIGHT_CAP = 10.0  # the authors' clamp of log w_t (from above only)


def log_prefix_weight(inputs: ObjectiveInputs, mask: torch.Tensor, mode: Literal["cumprod", "geomean"]) -> torch.Tensor:
    """log w_t = min(sg[S_t] + log π_θ(o_t) − sg[log π_θ(o_t)], 10): w_t has the value exp(S_t) and
    the gradient of token t's own log-prob only. S_t = Σ_{i≤t} log ρ_i (cumprod) or that sum over
    the count of trained tokens up to t (geomean); log ρ_i clamped to ±20, masked tokens add 0."""
    log_rho = log_token_ratio(inputs.logprobs, inputs.anchor_logprobs).detach()
    weights = mask.to(log_rho.dtype)
    total = torch.cumsum(log_rho * weights, dim=-1)
    if mode == "geomean":
        total = total / torch.cumsum(weights, dim=-1).clamp(min=1.0)
    logp = inputs.logprobs
    return (torch.where(mask, total, 0.0) + logp - logp.detach()).clamp(max=LOG_WEIGHT_CAP)


class CTPO(ClippedObjective):
    """CTPO: the exact prefix ratio in PPO's clipped surrogate, with a dual clip.

        S_t = Σ_{i≤t} log ρ_i,   w_t = exp(min(S_t, 10))  (value; its gradient is w_t ∇log π_θ(o_t))
        ℓ_t = max(−Â·w_t, −Â·clip(w_t, 1 − ε_low, 1 + ε_high));   Â < 0: ℓ_t = min(ℓ_t, −Â·c)
        L   = Σ_{i,t} ℓ_{i,t} / Σ_i |o_i|   (token-mean)

    Defaults are the authors' (verl's actor defaults): ε_low = ε_high = 0.2, c = 3. Unlike
    `prefix` (a detached, clipped weight on log π_θ), the PPO clip here zeroes the gradient of a
    token whose prefix ratio has left the band in the advantage's direction.
    """

    uses_prefix_weight = True
    prefix_mode: ClassVar[Literal["cumprod", "geomean"]] = "cumprod"

    dual_clip: float = Field(3.0, gt=1.0, description="dual-clip constant c for Â < 0")

    def __call__(self, inputs: ObjectiveInputs) -> ObjectiveOutput:
        mask = inputs.response_mask.bool()
        log_weight = log_prefix_weight(inputs, mask, self.prefix_mode)
        per_token, clipping = ppo_clip_surrogate(
            log_weight.exp(), inputs.token_advantages(), self.clip_low, self.clip_high, self.dual_clip
        )
        return ObjectiveOutput(self.aggregate(per_token, mask, inputs.counts), prefix_metrics(inputs, mask, log_weight)
                               | clipping.metrics(mask))  # fmt: skip


class PNPO(CTPO):
    """PNPO: the prefix's geometric-mean ratio in CTPO's surrogate (CTPO's `cum-token-geomean`).

        S_t = (1/t) Σ_{i≤t} log ρ_i,   w_t = exp(min(S_t, 10))
        ℓ_t = max(−Â·w_t, −Â·clip(w_t, 1 − ε_low, 1 + ε_high));   Â < 0: ℓ_t = min(ℓ_t, −Â·c)

    The geometric mean does not grow with t as the product does, so one clip band fits every
    position.
    """

    prefix_mode: ClassVar[Literal["cumprod", "geomean"]] = "geomean"


class CTPOLA(Objective):
    """CTPO-LA: CTPO with a log-space clip band that widens with position t (1-based, trained tokens).

        b_t = t^p,   ℓ_t = max(−Â·w_t, −Â·exp(clip(log w_t, −a_low·b_t, a_high·b_t)))
        Â < 0:  ℓ_t = min(ℓ_t, −Â·exp(a_c·b_t))
        L   = Σ_{i,t} ℓ_{i,t} / Σ_i |o_i|   (token-mean)

    w_t as CTPO's (product, or geometric mean with `prefix_mode: geomean`, for which the
    authors recommend p = −0.5). Defaults are the authors' (`ctpo.sh`): a_low = 0.025,
    a_high = 0.05, a_c = 0.05, p = 0.5: the band is [0.975, 1.05] at t = 1 and [0.78, 1.65] at t = 100.
    """

    uses_prefix_weight = True

    prefix_mode: Literal["cumprod", "geomean"] = Field("cumprod", description="w_t from the prefix's product or geometric mean")
    la_clip_low: float = Field(0.025, gt=0.0, description="a_low: the band's log lower bound at t = 1")
    la_clip_high: float = Field(0.05, gt=0.0, description="a_high: the band's log upper bound at t = 1")
    la_clip_c: float = Field(0.05, gt=0.0, description="a_c: log of the dual-clip constant at t = 1")
    la_power: float = Field(0.5, description="p: the bounds scale with t^p (0: one band for every position)")

    def __call__(self, inputs: ObjectiveInputs) -> ObjectiveOutput:
        mask = inputs.response_mask.bool()
        log_weight = log_prefix_weight(inputs, mask, self.prefix_mode)
        scale = torch.cumsum(mask.to(log_weight.dtype), dim=-1).clamp(min=1.0).pow(self.la_power)
        low, high = (-self.la_clip_low * scale).exp(), (self.la_clip_high * scale).exp()
        per_token, clipping = ppo_clip_surrogate(
            log_weight.exp(), inputs.token_advantages(), low, high, (self.la_clip_c * scale).exp()
        )
        return ObjectiveOutput(self.aggregate(per_token, mask, inputs.counts), prefix_metrics(inputs, mask, log_weight)
                               | clipping.metrics(mask))  # fmt: skip


def prefix_metrics(inputs: ObjectiveInputs, mask: torch.Tensor, log_weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The token ratio's and the prefix weight's mean, min and max; the weight's median and 10% / 90% points."""
    weights = log_weight.detach().exp()[mask]
    points = (torch.quantile(weights.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
              if weights.numel() else torch.ones(3, dtype=torch.float64))  # fmt: skip
    return {
        **ratio_metrics(log_token_ratio(inputs.logprobs, inputs.anchor_logprobs), mask),
        **ratio_metrics(log_weight, mask, "weight"),
        "weight_p10": points[0], "weight_p50": points[1], "weight_p90": points[2],
        "weight_below_half_frac": masked_fraction(log_weight.detach().exp() < 0.5, mask),
    }  # fmt: skip
