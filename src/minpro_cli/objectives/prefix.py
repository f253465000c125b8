"""The exact off-policy correction: the full cumulative prefix ratio."""

from __future__ import annotations

from pydantic import Field

from minpro_cli.objectives import LOG_RATIO_CLAMP, ObjectiveInputs, ObjectiveOutput, masked_fraction, masked_mean
from minpro_cli.objectives.logratios import log_prefix_ratio, log_token_ratio
from minpro_cli.objectives.surrogates import ClippedObjective, detached_weight_surrogate, ratio_metrics


class PrefixRatio(ClippedObjective):
    """Token weighted by the cumulative prefix ratio (exact for deterministic transitions).

        ρ_{1:t} = ∏_{i≤t, i trained} ρ_i
        L = − Σ_{i,t} sg[clip(ρ_{1:t}, 1 − ε_low, 1 + ε_high)] · Â_{i,t} · log π_θ(o_t | …)  /  Σ_i |o_i|
    (token-mean shown). This is the correction MinPRO replaces: a product of T ratios has
    variance that grows with T, which the paper reports does not help. Here so the
    comparison can be run. log ρ_{1:t} is clamped to ±20 before exp; defaults as MinPRO.
    """

    uses_prefix_weight = True

    eps_low: float = Field(1.0, ge=0.0, description="lower clip bound 1 − eps_low (≥ 1: none)")
    eps_high: float = Field(0.2, ge=0.0, description="upper clip bound 1 + eps_high")

    def __call__(self, inputs: ObjectiveInputs) -> ObjectiveOutput:
        mask = inputs.response_mask.bool()
        log_rho = log_token_ratio(inputs.logprobs, inputs.anchor_logprobs)
        log_prefix = log_prefix_ratio(log_rho, mask).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        per_token, weight, clipping = detached_weight_surrogate(
            log_prefix.exp(), inputs.token_advantages(), inputs.logprobs, self.clip_low, self.clip_high
        )
        metrics = {
            **ratio_metrics(log_rho, mask),
            **ratio_metrics(log_prefix, mask, "prefix_ratio"),
            "weight_mean": masked_mean(weight, mask),
            "weight_below_half_frac": masked_fraction(log_prefix.exp() < 0.5, mask),
            **clipping.metrics(mask),
        }
        return ObjectiveOutput(loss=self.aggregate(per_token, mask, inputs.counts), metrics=metrics)
