"""CE-GPPO — Coordinating Entropy via Gradient-Preserving Policy Optimization (arXiv
2509.20712), as its authors' `compute_gppo_loss_general_beta` computes it (Kwai-Klear/CE-GPPO)."""

from __future__ import annotations

import torch
from pydantic import Field

from minpro_cli.objectives import ObjectiveInputs, ObjectiveOutput
from minpro_cli.objectives.logratios import log_token_ratio
from minpro_cli.objectives.surrogates import ClippedObjective, Clipping, ratio_metrics


class CEGPPO(ClippedObjective):
    """CE-GPPO: where PPO's clip would zero a token's gradient, keep it, scaled by β and the bound.

        ρ_t = π_θ/π_old,  g_t = ρ_t / sg[ρ_t]   (value 1, gradient ∇log π_θ)
        ℓ_t = −β_low·(1 − ε_low)·g_t·Â    where ρ_t < 1 − ε_low and Â < 0
        ℓ_t = −β_high·(1 + ε_high)·g_t·Â  where ρ_t > 1 + ε_high and Â > 0
        ℓ_t = −ρ_t·Â                      elsewhere;  Â < 0: ℓ_t = min(ℓ_t, −Â·c)

    β = 0 is PPO's clip (no gradient outside the band); β = 1 gives those tokens the
    gradient the bound's ratio would. Authors' defaults (7B math recipe): β_low 0.75, β_high
    1.0, ε 0.2 / 0.2, dual clip c = 10, token-mean.
    """

    beta_low: float = Field(0.75, ge=0.0, description="β on the gradient of tokens below 1 − ε_low with Â < 0")
    beta_high: float = Field(1.0, ge=0.0, description="β on the gradient of tokens above 1 + ε_high with Â > 0")
    dual_clip: float = Field(10.0, gt=1.0, description="c: the loss of a token with Â < 0 is at most −Â·c")

    def __call__(self, inputs: ObjectiveInputs) -> ObjectiveOutput:
        mask = inputs.response_mask.bool()
        log_rho = log_token_ratio(inputs.logprobs, inputs.anchor_logprobs)
        ratio, adv = log_rho.exp(), inputs.token_advantages()
        gradient_only = ratio / ratio.detach()
        clipping = Clipping(low=(ratio.detach() < self.clip_low) & (adv < 0),
                            high=(ratio.detach() > self.clip_high) & (adv > 0))  # fmt: skip
        per_token = torch.where(
            clipping.low,
            -self.beta_low * self.clip_low * gradient_only * adv,
            torch.where(clipping.high, -self.beta_high * self.clip_high * gradient_only * adv, -ratio * adv),
        )
        per_token = torch.where(adv < 0, torch.minimum(per_token, -adv * self.dual_clip), per_token)
        metrics = {**ratio_metrics(log_rho, mask), **clipping.metrics(mask)}
        return ObjectiveOutput(loss=self.aggregate(per_token, mask, inputs.counts), metrics=metrics)
