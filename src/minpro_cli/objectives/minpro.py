"""MinPRO — Minimum Prefix Ratio (arXiv 2601.22718)."""

from __future__ import annotations

import torch
from pydantic import Field

from minpro_cli.objectives import (
    ObjectiveInputs,
    ObjectiveOptions,
    ObjectiveOutput,
    aggregate_loss,
    masked_mean,
    masked_min,
)
from minpro_cli.objectives.prefix import log_min_prefix_ratio, log_token_ratio


class MinPRO(ObjectiveOptions):
    """MinPRO with a detached, clipped weight (CISPO-style soft clip).

    ρ_t  = π_θ(o_t | q, o_<t) / μ(o_t | q, o_<t)
    ρ̲_t  = min_{i<t} ρ_i            (strict; ρ̲_1 = 1; masked tokens never enter)
    w_t  = clip(ρ̲_t · ρ_t, 1 − eps_low, 1 + eps_high)
    L    = − Σ_{i,t} sg[w_t] · Â_{i,t} · log π_θ(o_t | …)  /  Σ_i |o_i|   (token-mean)

    With eps_low ≥ 1 there is no lower truncation (the default: a lower clip would undo the
    damping the prefix minimum exists for). `prefix_cap_at_one` uses min(1, ρ̲_t).
    TRL's absolute cap min(r, ε_max) is eps_low ≥ 1, eps_high = ε_max − 1.
    """

    eps_low: float = Field(1.0, ge=0.0)
    eps_high: float = Field(0.2, ge=0.0)
    prefix_cap_at_one: bool = False

    def __call__(self, inputs: ObjectiveInputs) -> ObjectiveOutput:
        return minpro_loss(inputs, self)


def minpro_loss(inputs: ObjectiveInputs, opts: MinPRO) -> ObjectiveOutput:
    mask = inputs.response_mask.bool()
    log_rho = log_token_ratio(inputs.logprobs, inputs.old_logprobs).detach()
    log_min_prefix = log_min_prefix_ratio(log_rho, mask)
    if opts.prefix_cap_at_one:
        log_min_prefix = log_min_prefix.clamp(max=0.0)
    raw_weight = torch.exp(log_min_prefix + log_rho)
    low, high = 1.0 - opts.eps_low, 1.0 + opts.eps_high
    weight = raw_weight.clamp(min=low, max=high)
    per_token = -weight * inputs.token_advantages() * inputs.logprobs
    loss = aggregate_loss(per_token, mask, opts.loss_agg)

    rho, min_prefix = log_rho.exp(), log_min_prefix.exp()
    clipped_high, clipped_low = (raw_weight > high) & mask, (raw_weight < low) & mask
    n_tokens = max(int(mask.sum()), 1)
    metrics = {
        "ratio_mean": masked_mean(rho, mask),
        "ratio_min": masked_min(rho, mask),
        "min_prefix_ratio_mean": masked_mean(min_prefix, mask),
        "min_prefix_ratio_min": masked_min(min_prefix, mask),
        "weight_mean": masked_mean(weight, mask),
        "clip_frac_high": int(clipped_high.sum()) / n_tokens,
        "clip_frac_low": int(clipped_low.sum()) / n_tokens,
        "clip_frac": int((clipped_high | clipped_low).sum()) / n_tokens,
    }
    return ObjectiveOutput(loss=loss, metrics=metrics)
