"""SAPO — Soft Adaptive Policy Optimization (Qwen team, arXiv 2511.20347): a smooth gate instead
of a clip. Checked against verl's `compute_policy_loss_sapo`; the same as TRL's `loss_type="sapo"`."""

from __future__ import annotations

import torch
from pydantic import Field

from minpro_cli.objectives import LossAgg, Objective, ObjectiveInputs, ObjectiveOutput, masked_fraction, masked_mean
from minpro_cli.objectives.logratios import log_token_ratio
from minpro_cli.objectives.surrogates import ratio_metrics


class SAPO(Objective):
    """SAPO: the token ratio passes through a smooth, sign-dependent gate instead of a hard clip.

        f(ρ) = (4/τ) · σ(τ·(ρ − 1)),     τ = tau_pos where Â > 0, tau_neg elsewhere
        ℓ_t = − f(ρ_t) · Â_t
        L   = (1/G) Σ_i (1/|o_i|) Σ_t ℓ_{i,t}       (seq-mean-token-mean by default)

    ∂ℓ/∂log π = −Â · 4σ(1−σ) · ρ: exactly the policy gradient −Â at ρ = 1, fading smoothly (not
    to zero at a cliff) as ρ leaves 1; a larger τ_neg shuts negative-advantage tokens off faster.
    Defaults are verl's and TRL's (τ_pos 1, τ_neg 1.05, seq-mean-token-mean); log ρ is clamped
    to ±20 as verl does.
    """

    loss_agg: LossAgg = Field("seq-mean-token-mean", description="how per-token losses become one scalar")
    tau_pos: float = Field(1.0, gt=0.0, description="gate temperature for positive advantages")
    tau_neg: float = Field(1.05, gt=0.0, description="gate temperature for non-positive advantages")

    def __call__(self, inputs: ObjectiveInputs) -> ObjectiveOutput:
        mask = inputs.response_mask.bool()
        log_rho = log_token_ratio(inputs.logprobs, inputs.anchor_logprobs)
        ratio, adv = log_rho.exp(), inputs.token_advantages()
        tau = torch.where(adv > 0, torch.full_like(adv, self.tau_pos), torch.full_like(adv, self.tau_neg))
        gate = torch.sigmoid(tau * (ratio - 1.0))
        per_token = -(4.0 / tau) * gate * adv
        # the factor the gate puts on the policy gradient: 1 on-policy, → 0 far off-policy
        weight = (4.0 * gate * (1.0 - gate) * ratio).detach()
        metrics = {
            **ratio_metrics(log_rho, mask),
            "gradient_weight_mean": masked_mean(weight, mask),
            "gradient_weight_below_half": masked_fraction(weight < 0.5, mask),
        }
        return ObjectiveOutput(loss=self.aggregate(per_token, mask, inputs.counts), metrics=metrics)
