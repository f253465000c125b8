"""DPPO — Divergence Proximal Policy Optimization (arXiv 2602.04879), its Binary-TV and
Binary-KL masks, as verl's `dppo_tv` and `dppo_kl` losses compute them."""

from __future__ import annotations

import torch
from pydantic import Field

from minpro_cli.objectives import (
    LOG_RATIO_CLAMP,
    LossAgg,
    Objective,
    ObjectiveInputs,
    ObjectiveOutput,
    masked_fraction,
)
from minpro_cli.objectives.surrogates import ratio_metrics

BINARY_KL_EPS = 1e-8  # the authors' guard in log((1 − q)/(1 − p))


class DPPOTV(Objective):
    """DPPO-Binary-TV: a token's update is dropped when it would move the sampled token's
    probability past δ in the direction its advantage pushes; the kept tokens get the plain
    importance-weighted policy gradient.

        p_t = π_θ(y_t),  q_t = π_old(y_t),  ρ_t = exp(clamp(log p_t − log q_t, ±20))
        M_t = [p_t − q_t ≤ δ_high]  if Â_t > 0,  [p_t − q_t ≥ −δ_low]  otherwise
        ℓ_t = −Â_t · sg[min(ρ_t, c)] · M_t · log π_θ(y_t)

    The gradient is −Â_t·ρ_t·∇log π_θ on kept tokens (the truncation c is the paper's TIS,
    off at the authors' 10000). Authors' defaults: δ = 0.15, `seq-mean-token-sum-norm`.
    """

    delta_low: float = Field(0.15, ge=0.0, description="bound on the divergence when Â ≤ 0")
    delta_high: float = Field(0.15, ge=0.0, description="bound on the divergence when Â > 0")
    truncation: float = Field(10000.0, gt=0.0, description="c: the detached ratio is truncated at c")
    loss_agg: LossAgg = Field("seq-mean-token-sum-norm", description="how per-token losses become one scalar")

    def kept(self, p: torch.Tensor, q: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor,
             positive: torch.Tensor) -> torch.Tensor:  # fmt: skip
        return torch.where(positive, p - q <= self.delta_high, p - q >= -self.delta_low)

    def __call__(self, inputs: ObjectiveInputs) -> ObjectiveOutput:
        mask = inputs.response_mask.bool()
        log_p, log_q = inputs.logprobs, inputs.anchor_logprobs
        log_rho = (log_p - log_q).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        adv = inputs.token_advantages()
        weight = log_rho.detach().exp().clamp(max=self.truncation)
        p, q = log_p.detach().exp(), log_q.exp()
        keep = self.kept(p, q, log_p.detach(), log_q, adv > 0)
        per_token = -adv * weight * keep.to(log_p.dtype) * log_p
        metrics = {
            **ratio_metrics(log_rho, mask),
            "masked_frac": masked_fraction(~keep, mask),
            "masked_frac_positive": masked_fraction(~keep & (adv > 0), mask),
            "masked_frac_negative": masked_fraction(~keep & (adv <= 0), mask),
            "truncated_frac": masked_fraction(keep & (log_rho.detach().exp() > self.truncation), mask),
        }
        return ObjectiveOutput(loss=self.aggregate(per_token, mask, inputs.counts), metrics=metrics)


class DPPOKL(DPPOTV):
    """DPPO-Binary-KL: DPPO-Binary-TV's mask with the binary KL between π_old and π_θ on the
    sampled token's probability, and only for moves in the advantage's direction.

        D_t = q_t·log(q_t/p_t) + (1 − q_t)·log((1 − q_t + 1e-8)/(1 − p_t + 1e-8))
        M_t = [D_t ≤ δ_high or p_t ≤ q_t]  if Â_t > 0,  [D_t ≤ δ_low or p_t ≥ q_t]  otherwise
        ℓ_t = −Â_t · sg[min(ρ_t, c)] · M_t · log π_θ(y_t)

    Authors' defaults: δ = 0.05, `seq-mean-token-sum-norm`, c = 10000.
    """

    delta_low: float = Field(0.05, ge=0.0, description="bound on the binary KL when Â ≤ 0")
    delta_high: float = Field(0.05, ge=0.0, description="bound on the binary KL when Â > 0")

    def kept(self, p: torch.Tensor, q: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor,
             positive: torch.Tensor) -> torch.Tensor:  # fmt: skip
        binary_kl = q * (log_q - log_p) + (1 - q) * torch.log((1 - q + BINARY_KL_EPS) / (1 - p + BINARY_KL_EPS))
        return torch.where(positive, (binary_kl <= self.delta_high) | (p <= q), (binary_kl <= self.delta_low) | (p >= q))
