"""MinPRO — Minimum Prefix Ratio (arXiv 2601.22718)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from minpro_cli.objectives import LOG_RATIO_CLAMP, ObjectiveInputs, ObjectiveOutput, masked_fraction, masked_mean
from minpro_cli.objectives.logratios import log_min_prefix_ratio, log_token_ratio
from minpro_cli.objectives.surrogates import (
    ClippedObjective,
    detached_weight_surrogate,
    ppo_clip_surrogate,
    ratio_metrics,
)


class MinPRO(ClippedObjective):
    """MinPRO: each token weighted by the minimum ratio of its prefix times its own ratio.

        ρ_t  = π_θ(o_t | q, o_<t) / μ(o_t | q, o_<t)
        ρ̲_t  = min_{i<t} ρ_i            (strict; ρ̲_1 = 1; masked tokens never enter)
        w_t  = ρ̲_t · ρ_t

    clip_mode = "cispo" (default; detached weight, gradient only through log π_θ):
        L = − Σ_{i,t} sg[clip(w_t, 1 − ε_low, 1 + ε_high)] · Â_{i,t} · log π_θ(o_t | …)  /  Σ_i |o_i|
    clip_mode = "ppo" (w_t in place of ρ_t in the PPO surrogate, ρ̲_t detached):
        L = Σ_{i,t} max(−Â·w_t, −Â·clip(w_t, 1 − ε_low, 1 + ε_high))  /  Σ_i |o_i|,   w_t = sg[ρ̲_t]·ρ_t
    (token-mean shown; `loss_agg` picks the reduction).

    Defaults ε_low = 1.0, ε_high = 0.2. The lower bound stays out of the way on purpose: a
    lower clip at 0.8 would lift every damped token back to 0.8 and undo exactly what the
    prefix minimum is for. The paper does not publish its ε, so both stay options.
    `prefix_cap_at_one` uses min(1, ρ̲_t): the prefix may damp a token, never boost it.
    log ρ_t and log w_t are clamped to ±20 before exp.
    """

    uses_prefix_weight = True

    eps_low: float = Field(1.0, ge=0.0, description="lower clip bound 1 − eps_low (≥ 1: none)")
    eps_high: float = Field(0.2, ge=0.0, description="upper clip bound 1 + eps_high")
    prefix_cap_at_one: bool = Field(False, description="use min(1, ρ̲_t)")
    clip_mode: Literal["cispo", "ppo"] = Field("cispo", description="detached weight, or PPO surrogate on w_t")

    def __call__(self, inputs: ObjectiveInputs) -> ObjectiveOutput:
        mask = inputs.response_mask.bool()
        log_rho = log_token_ratio(inputs.logprobs, inputs.anchor_logprobs)
        log_min_prefix = log_min_prefix_ratio(log_rho, mask)
        if self.prefix_cap_at_one:
            log_min_prefix = log_min_prefix.clamp(max=0.0)
        log_weight = (log_min_prefix + log_rho).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        adv = inputs.token_advantages()
        if self.clip_mode == "cispo":
            per_token, weight, clipping = detached_weight_surrogate(
                log_weight.exp(), adv, inputs.logprobs, self.clip_low, self.clip_high
            )
        else:
            per_token, clipping = ppo_clip_surrogate(log_weight.exp(), adv, self.clip_low, self.clip_high)
            weight = log_weight.detach().exp().clamp(self.clip_low, self.clip_high)
        metrics = {
            **ratio_metrics(log_rho, mask),
            **ratio_metrics(log_min_prefix, mask, "min_prefix_ratio"),
            "weight_mean": masked_mean(weight, mask),
            "weight_below_half_frac": masked_fraction(log_weight.detach().exp() < 0.5, mask),
            **clipping.metrics(mask),
        }
        return ObjectiveOutput(loss=self.aggregate(per_token, mask, inputs.counts), metrics=metrics)
