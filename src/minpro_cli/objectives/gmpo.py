"""GMPO — Geometric-Mean Policy Optimization (arXiv 2507.20673), as verl's `geo_mean` loss
computes it (adapted there from callsys/GMPO)."""

from __future__ import annotations

import torch
from pydantic import Field

from minpro_cli.objectives import LossAgg, ObjectiveInputs, ObjectiveOutput, masked_fraction
from minpro_cli.objectives.surrogates import ClippedObjective, ratio_metrics

DENOMINATOR_EPS = 1e-8  # the authors' guard on each row's token count


class GMPO(ClippedObjective):
    """GMPO: one ratio per response, the geometric mean of its token ratios, each clipped in log
    space in the direction of the advantage's sign.

        s = sign(Â_i),  r_t = log ρ_t,  r̃_t = s · min(s·r_t, s·clip(r_t, −ε_low, ε_high))
        R_i = exp((1/|o_i|) Σ_t r̃_t),   Â_i = (1/|o_i|) Σ_t Â_{i,t}
        L   = −(1/B) Σ_i Â_i · R_i

    Bounds are on log ρ (the authors' ε = 0.4: ratios within [e^−0.4, e^0.4]); log ρ is not
    clamped before. The gradient of R_i reaches every token whose log-ratio was not clipped. The
    authors aggregate by the sequence mean only (`loss_agg: seq-mean-token-sum` with each row's
    loss spread evenly over its tokens); other modes are accepted but not theirs.
    """

    eps_low: float = Field(0.4, ge=0.0, description="log-space lower bound −eps_low")
    eps_high: float = Field(0.4, ge=0.0, description="log-space upper bound eps_high")
    loss_agg: LossAgg = Field("seq-mean-token-sum", description="how per-token losses become one scalar")

    def __call__(self, inputs: ObjectiveInputs) -> ObjectiveOutput:
        mask = inputs.response_mask.bool()
        weights = mask.to(inputs.logprobs.dtype)
        log_rho = inputs.logprobs - inputs.anchor_logprobs
        adv = inputs.token_advantages()
        sign = torch.sign(adv)
        clipped = log_rho.clamp(-self.eps_low, self.eps_high)
        kept = sign * torch.minimum(sign * log_rho, sign * clipped)
        lengths = weights.sum(-1) + DENOMINATOR_EPS
        ratio = torch.exp((kept * weights).sum(-1) / lengths)
        per_row = -(adv * weights).sum(-1) / lengths * ratio
        per_token = (per_row / weights.sum(-1).clamp(min=1.0))[:, None].expand_as(log_rho)
        outside = log_rho.detach() != clipped.detach()
        metrics = {
            **ratio_metrics(log_rho, mask),
            "sequence_ratio_mean": ratio.detach()[mask.any(-1)].mean() if mask.any() else torch.ones(()),
            "clip_frac_high": masked_fraction(outside & (adv > 0), mask),
            "clip_frac_low": masked_fraction(outside & (adv < 0), mask),
        }
        return ObjectiveOutput(loss=self.aggregate(per_token, mask, inputs.counts), metrics=metrics)
