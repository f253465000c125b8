"""CISPO — Clipped IS-weight Policy Optimization (MiniMax-M1, arXiv 2506.13585)."""

from __future__ import annotations

from pydantic import Field

from minpro_cli.objectives import ObjectiveInputs, ObjectiveOutput, masked_mean
from minpro_cli.objectives.logratios import log_token_ratio
from minpro_cli.objectives.surrogates import ClippedObjective, detached_weight_surrogate, ratio_metrics


class CISPO(ClippedObjective):
    """Token ratio clipped and detached; the gradient flows only through log π_θ.

        L = − Σ_{i,t} sg[clip(ρ_t, 1 − ε_low, 1 + ε_high)] · Â_{i,t} · log π_θ(o_t | …)  /  Σ_i |o_i|

    Same as verl's `cispo` policy loss (clip_ratio_low / clip_ratio_high = eps_low /
    eps_high). TRL's `loss_type="cispo"` caps min(ρ_t, ε_max): eps_low = 1, eps_high = ε_max − 1
    (TRL's default ε_max = 5 is eps_high = 4).
    """

    eps_low: float = Field(1.0, ge=0.0, description="lower clip bound 1 − eps_low (≥ 1: none)")
    eps_high: float = Field(0.2, ge=0.0, description="upper clip bound 1 + eps_high")

    def __call__(self, inputs: ObjectiveInputs) -> ObjectiveOutput:
        mask = inputs.response_mask.bool()
        log_rho = log_token_ratio(inputs.logprobs, inputs.anchor_logprobs)
        per_token, weight, clipping = detached_weight_surrogate(
            log_rho.exp(), inputs.token_advantages(), inputs.logprobs, self.clip_low, self.clip_high
        )
        metrics = {**ratio_metrics(log_rho, mask), "weight_mean": masked_mean(weight, mask), **clipping.metrics(mask)}
        return ObjectiveOutput(loss=self.aggregate(per_token, mask, inputs.counts), metrics=metrics)
