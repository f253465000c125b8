"""TOPR — Tapered Off-Policy REINFORCE (arXiv 2503.14286), as ROLL's `pg_variant: topr`
computes it (`ActorWorker._compute_topr_loss`, alibaba/ROLL)."""

from __future__ import annotations

import torch
from pydantic import Field

from minpro_cli.objectives import LossAgg, Objective, ObjectiveInputs, ObjectiveOutput, masked_fraction
from minpro_cli.objectives.logratios import log_token_ratio
from minpro_cli.objectives.surrogates import ratio_metrics


class TOPR(Objective):
    """TOPR: responses that earned a reward are trained as in supervised fine-tuning, without
    importance weight; the others by REINFORCE with the ratio truncated to [0, 1].

        ℓ_t = −w₊ · Â_t · log π_θ(y_t)                          where R_i > 0
        ℓ_t = −w₋ · sg[clamp(ρ_t, 0, 1)] · Â_t · log π_θ(y_t)   where R_i ≤ 0

    R_i is the response's reward (not its advantage). As ROLL, the ratio is per token; the
    paper's is the whole response's ratio π(τ)/μ(τ). Defaults (ROLL's): w₊ = w₋ = 1,
    seq-mean-token-mean.
    """

    positive_weight: float = Field(1.0, ge=0.0, description="w₊: the weight of responses with a positive reward")
    negative_weight: float = Field(1.0, ge=0.0, description="w₋: the weight of the others")
    loss_agg: LossAgg = Field("seq-mean-token-mean", description="how per-token losses become one scalar")

    def __call__(self, inputs: ObjectiveInputs) -> ObjectiveOutput:
        if inputs.rewards is None:
            raise ValueError("topr needs each response's reward (ObjectiveInputs.rewards); minpro train passes it")
        mask = inputs.response_mask.bool()
        log_rho = log_token_ratio(inputs.logprobs, inputs.anchor_logprobs)
        adv = inputs.token_advantages()
        positive = (inputs.rewards > 0)[:, None].expand_as(mask)
        tapered = log_rho.detach().exp().clamp(0.0, 1.0)
        weight = torch.where(positive, self.positive_weight, self.negative_weight * tapered)
        per_token = -weight * adv * inputs.logprobs
        metrics = {
            **ratio_metrics(log_rho, mask),
            "positive_frac": masked_fraction(positive, mask),
            "tapered_frac": masked_fraction(~positive & (tapered < 1.0), mask),
        }
        return ObjectiveOutput(loss=self.aggregate(per_token, mask, inputs.counts), metrics=metrics)
