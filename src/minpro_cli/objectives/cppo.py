"""CPPO — Cumulative Prefix-divergence Policy Optimization (arXiv 2606.10968), the Binary-TV
variant of its authors' verl PR #6731 (also merged in Tencent-Hunyuan/UniRL PR #58)."""

from __future__ import annotations

import torch
from pydantic import Field

from minpro_cli.objectives import (
    LOG_RATIO_CLAMP,
    LossAgg,
    Objective,
    ObjectiveInputs,
    ObjectiveOutput,
    masked_fraction,
    masked_mean,
)
from minpro_cli.objectives.surrogates import ratio_metrics


class CPPO(Objective):
    """CPPO: DPPO's Binary-TV surrogate, with a trust region that is tighter early in the
    response and shrinks as the prefix has already drifted from π_old.

        D_t = |π_θ(y_t) − π_old(y_t)|,  w_t = 1 − (1 − w_min)·(t − 1)/(|o| − 1)   (w_1 = 1)
        S_{t−1} = Σ_{j<t} w_j·D_j,  W_{t−1} = Σ_{j<t} w_j
        δ_b = clamp(k · quantile_q(D of the response), δ_b_min, m·δ_b_min)     (per response)
        M_t = [Â_t·(ρ_t − 1) ≤ 0  or  w_t·D_t ≤ min(δ, δ + δ_b·W_{t−1} − S_{t−1})]
        ℓ_t = −Â_t · sg[min(ρ_t, c)] · M_t · log π_θ(y_t)

    A token moving toward π_old is always kept; the divergence of every token, kept or not,
    spends the prefix's budget. Defaults are the authors' (`CPPOConfig`: w_min 0.8, δ_b_min
    0.02, q 0.9, k 1, m 5 — the paper's Eq. 22 says 2) with DPPO's δ = 0.15, c = 20 and
    `seq-mean-token-sum-norm`. The position weight spans each response's own length (the
    paper's Eq. 9; the PR's default), never the padded width.
    """

    delta: float = Field(0.15, gt=0.0, description="δ: the token-level bound on w_t·D_t")
    w_min: float = Field(0.8, gt=0.0, le=1.0, description="the position weight at the response's last token")
    delta_b: float = Field(0.02, ge=0.0, description="δ_b_min: the floor of the prefix budget's rate")
    delta_b_q: float = Field(0.9, ge=0.0, le=1.0, description="q: the quantile of D that sets a response's rate")
    delta_b_k: float = Field(1.0, ge=0.0, description="k: the rate is k times that quantile (0: the floor)")
    delta_b_max_mult: float = Field(5.0, ge=1.0, description="m: the rate is at most m·δ_b_min")
    truncation: float = Field(20.0, gt=0.0, description="c: the detached ratio is truncated at c")
    loss_agg: LossAgg = Field("seq-mean-token-sum-norm", description="how per-token losses become one scalar")

    def kept(self, inputs: ObjectiveInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """M_t, and the numbers behind it."""
        mask = inputs.response_mask.bool()
        dtype = torch.promote_types(inputs.logprobs.dtype, torch.float32)  # quantile and prefix sums: not in bf16
        maskf = mask.to(dtype)
        log_p, log_q = inputs.logprobs.detach().to(dtype), inputs.anchor_logprobs.to(dtype)
        divergence = (log_p.exp() - log_q.exp()).abs() * maskf
        rate = torch.nanquantile(divergence.masked_fill(~mask, float("nan")), self.delta_b_q, dim=-1, keepdim=True)
        rate = (self.delta_b_k * rate).nan_to_num(self.delta_b).clamp(self.delta_b, self.delta_b_max_mult * self.delta_b)
        length = maskf.sum(-1, keepdim=True)
        elapsed = (torch.arange(mask.shape[-1], dtype=dtype, device=mask.device) / (length - 1).clamp(min=1)).clamp(0, 1)
        weight = (1 - (1 - self.w_min) * elapsed) * maskf
        spent = weight * divergence
        budget = torch.clamp(self.delta + rate * (weight.cumsum(-1) - weight) - (spent.cumsum(-1) - spent), max=self.delta)
        ratio = (log_p - log_q).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
        toward = inputs.token_advantages() * (ratio - 1) <= 0
        keep = (toward | (spent <= budget)) & mask
        return keep, {"toward_frac": masked_fraction(toward, mask), "rate": rate, "spent": spent}

    def __call__(self, inputs: ObjectiveInputs) -> ObjectiveOutput:
        mask = inputs.response_mask.bool()
        log_rho = (inputs.logprobs - inputs.anchor_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        keep, why = self.kept(inputs)
        weight = log_rho.detach().exp().clamp(max=self.truncation)
        per_token = -inputs.token_advantages() * weight * keep.to(log_rho.dtype) * inputs.logprobs
        rows = mask.any(-1)
        metrics = {
            **ratio_metrics(log_rho, mask),
            "masked_frac": masked_fraction(~keep, mask),
            "toward_frac": why["toward_frac"],
            "budget_rate_mean": why["rate"][rows].double().mean() if rows.any() else torch.zeros((), dtype=torch.float64),
            "weighted_divergence_mean": masked_mean(why["spent"], mask),
        }
        return ObjectiveOutput(loss=self.aggregate(per_token, mask, inputs.counts), metrics=metrics)
