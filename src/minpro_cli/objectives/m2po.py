"""M2PO — Second-Moment Trust Policy Optimization (Zheng et al., arXiv 2510.01161)."""

from __future__ import annotations

import torch
from pydantic import Field

from minpro_cli.objectives import Objective, ObjectiveInputs, ObjectiveOutput, masked_fraction, masked_mean
from minpro_cli.objectives.logratios import log_token_ratio
from minpro_cli.objectives.surrogates import ratio_metrics


class M2PO(Objective):
    """Unclipped token ratio with the batch's most off-policy tokens masked out.

        M̂_2 = (1/N) Σ_{trained t} (log ρ_t)²
        mask M: while M̂_2 of the kept tokens > τ, drop the kept token with the largest (log ρ_t)²
        L   = − Σ_{i,t} M_{i,t} · ρ_t · Â_{i,t}  /  Σ_i |o_i|        (token-mean: N counts dropped tokens too)

    No ratio clipping: the second-moment budget τ (`m2_threshold`, the authors' 0.04) is the
    trust region. The mask is computed over the whole minibatch given to the objective, from
    detached ratios. If every token must go, every token goes and the loss is 0.
    """

    couples_rows = True  # the mask is over the rows it is given

    m2_threshold: float = Field(0.04, gt=0.0, description="budget τ on the mean of (log ρ)² of kept tokens")

    def __call__(self, inputs: ObjectiveInputs) -> ObjectiveOutput:
        mask = inputs.response_mask.bool()
        log_rho = log_token_ratio(inputs.logprobs, inputs.anchor_logprobs)
        keep = second_moment_mask(log_rho.detach(), mask, self.m2_threshold)
        per_token = -keep.to(log_rho.dtype) * log_rho.exp() * inputs.token_advantages()
        m2 = log_rho.detach() ** 2
        metrics = {
            **ratio_metrics(log_rho, mask),
            "m2": masked_mean(m2, mask),
            "m2_kept": masked_mean(m2, keep),
            "m2_masked_frac": masked_fraction(~keep, mask),
        }
        return ObjectiveOutput(loss=self.aggregate(per_token, mask, inputs.counts), metrics=metrics)


def second_moment_mask(log_ratio: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """The M2PO mask: drop the fewest largest-(log ρ)² tokens so the kept mean is ≤ threshold.

    Vectorised form of the greedy loop: sort (log ρ)² descending; dropping the first k leaves
    the suffix mean S_k; k* = min{k : S_k ≤ τ} (S_N = 0 for the empty set).
    """
    m2 = (log_ratio**2)[mask]
    n = m2.numel()
    order = torch.argsort(m2, descending=True)
    sorted_m2 = m2[order]
    suffix_sum = torch.cat([sorted_m2.flip(0).cumsum(0).flip(0), sorted_m2.new_zeros(1)])
    suffix_count = torch.arange(n, -1, -1, device=m2.device, dtype=m2.dtype).clamp(min=1)
    within = suffix_sum / suffix_count <= threshold
    first_within = torch.argmax(within.to(torch.uint8))  # the last entry is always True
    keep_sorted = torch.arange(n, device=m2.device) >= first_within
    keep_flat = torch.empty_like(keep_sorted)
    keep_flat[order] = keep_sorted
    keep = torch.zeros_like(mask)
    keep[mask] = keep_flat
    return keep
