"""SPO — Simple Policy Optimization (Xie et al., arXiv 2401.16025): a quadratic penalty on the
ratio's distance from 1 instead of PPO's clip.

Written against minpro's first plugin API (`ObjectiveOptions`, `old_logprobs`, `self.aggregate`
without counts), which keeps working: minpro's tests use this file to check that it does."""

from __future__ import annotations

from pydantic import Field

from minpro_cli.objectives import LossAgg, ObjectiveInputs, ObjectiveOptions, ObjectiveOutput, masked_mean
from minpro_cli.objectives.logratios import log_token_ratio
from minpro_cli.objectives.surrogates import ratio_metrics


class SPO(ObjectiveOptions):
    """SPO: PPO's surrogate ρ·Â with a penalty that grows with the ratio's distance from 1.

        ℓ_t = − ( ρ_t · Â_t − |Â_t| / (2ε) · (ρ_t − 1)² )
        L   = (1/G) Σ_i (1/|o_i|) Σ_t ℓ_{i,t}       (seq-mean-token-mean by default)

    ∂ℓ/∂log π = −ρ·(Â − |Â|·(ρ − 1)/ε): the policy gradient −Â at ρ = 1, and zero where ρ has
    moved ε (in the direction Â pushes it) — a stationary point where PPO's clip has a cliff;
    beyond it the gradient pulls ρ back.
    """

    loss_agg: LossAgg = Field("seq-mean-token-mean", description="how per-token losses become one scalar")
    epsilon: float = Field(0.2, gt=0.0, description="ε, where the penalty cancels the surrogate's pull")

    def __call__(self, inputs: ObjectiveInputs) -> ObjectiveOutput:
        mask = inputs.response_mask.bool()
        log_rho = log_token_ratio(inputs.logprobs, inputs.old_logprobs)
        ratio, adv = log_rho.exp(), inputs.token_advantages()
        per_token = -(ratio * adv - adv.abs() / (2 * self.epsilon) * (ratio - 1.0).square())
        distance = (ratio.detach() - 1.0).abs()
        metrics = {
            **ratio_metrics(log_rho, mask),
            "penalty_mean": masked_mean(adv.abs() / (2 * self.epsilon) * distance.square(), mask),
            # tokens past the point where the penalty cancels the surrogate's gradient
            "beyond_epsilon_frac": masked_mean((distance > self.epsilon).to(ratio.dtype), mask),
        }
        return ObjectiveOutput(loss=self.aggregate(per_token, mask), metrics=metrics)
