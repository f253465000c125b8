"""GIPO — Gaussian Importance sampling Policy Optimization (arXiv 2603.03955). No public code
from its authors: written from the paper, with the defaults of RLinf's GIPO design note."""

from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator

from minpro_cli.objectives import Objective, ObjectiveInputs, ObjectiveOutput, masked_fraction, masked_mean
from minpro_cli.objectives.logratios import log_token_ratio
from minpro_cli.objectives.surrogates import ratio_metrics


class GIPO(Objective):
    """GIPO: the token ratio's gradient, softly damped by a Gaussian in the log-ratio instead of
    a hard clip, so a stale token keeps a small non-zero gradient.

        ρ_t = π_θ/π_old,  ρ̄_t = sg[clamp(ρ_t, ρ_min, ρ_max)]
        ω_t = exp(−(log ρ̄_t)² / (2σ²))
        ℓ_t = −ω_t · ρ_t · Â_t

    The gradient is −ω_t·ρ_t·Â_t·∇log π_θ: the policy gradient at ρ = 1, falling as
    exp(−(log ρ)²/2σ²) on either side. Defaults: σ = 1, ρ within [0.0067, 148] (≈ e^∓5),
    token-mean.
    """

    sigma: float = Field(1.0, gt=0.0, description="σ, the Gaussian's width in log ρ")
    rho_min: float = Field(0.0067, gt=0.0, description="ρ is clamped to at least rho_min inside the weight")
    rho_max: float = Field(148.0, gt=0.0, description="ρ is clamped to at most rho_max inside the weight")

    @model_validator(mode="after")
    def _ordered(self) -> GIPO:
        if self.rho_min >= self.rho_max:
            raise ValueError(f"rho_min ({self.rho_min}) must be below rho_max ({self.rho_max})")
        return self

    def __call__(self, inputs: ObjectiveInputs) -> ObjectiveOutput:
        mask = inputs.response_mask.bool()
        log_rho = log_token_ratio(inputs.logprobs, inputs.anchor_logprobs)
        adv = inputs.token_advantages()
        bounded = log_rho.detach().clamp(math.log(self.rho_min), math.log(self.rho_max))
        weight = torch.exp(-bounded.square() / (2 * self.sigma**2))
        per_token = -weight * log_rho.exp() * adv
        metrics = {
            **ratio_metrics(log_rho, mask),
            "weight_mean": masked_mean(weight, mask),
            "weight_below_half": masked_fraction(weight < 0.5, mask),  # |log ρ| > 1.18σ
        }
        return ObjectiveOutput(loss=self.aggregate(per_token, mask, inputs.counts), metrics=metrics)
