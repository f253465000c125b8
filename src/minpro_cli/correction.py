"""The correction layer: the sampler's mismatch corrected apart from the objective.

Three log-probs per token (docs/correction.md): μ drew it (the sampler's record), π_old is the
anchor (`train.anchor`), π_θ is trained. The objective sees π_θ / π_old; this layer sees the
behaviour factor

    c_t = π_old(o_t | …) / μ(o_t | …)          (log c_t clamped to ±20)

and turns it into a detached weight W_t ≥ 0 per token that scales the token's policy-gradient
term, whatever the objective (`scale_gradient`). With `train.anchor: behavior`, c ≡ 1.

Importance weight (`level`; masked tokens never enter a sum or a minimum):
    token        w_t = c_t
    sequence     w_t = ∏_{i} c_i                         (one weight per response)
    geometric    w_t = exp((1/|o|) Σ_i log c_i)           (one weight per response)
    prefix_min   w_t = min_{i<t} c_i · c_t                (MinPRO's surrogate of the prefix, on c)
    prefix       w_t = ∏_{i≤t} c_i                        (the exact prefix correction)
`action: truncate`: w ← clamp(w, low, high) (TIS; `low` optional). `action: mask`: w ← w · 1[low ≤ w ≤ high]
(IcePop; a weight of a whole response masks the response).

Rejection, each rule keeps a token or a response whose statistic lies in [low, high]:
    reject       k1 = −log c, k2 = ½ (log c)², k3 = c − 1 − log c per token; `agg: token` tests
                 each token, `mean | sum | max` the response's mean, sum or max
    veto         the response goes if any token's c_t lies outside [veto_low, veto_high]
    opsm_delta   the response goes if its advantage is negative and (1/|o|) Σ_t (log μ − log π_θ) > δ
                 (DeepSeek-V3.2's off-policy sequence mask, as TRL computes it: against π_θ)

W_t = w_t · keep_t. `metrics_only`: everything is measured, W ≡ 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from minpro_cli.objectives import LOG_RATIO_CLAMP
from minpro_cli.objectives.logratios import log_min_prefix_ratio, log_prefix_ratio
from minpro_cli.ratiostats import STEP_QUANTILES, quantiles

Level = Literal["token", "sequence", "geometric", "prefix_min", "prefix"]
Action = Literal["truncate", "mask"]
KLEstimate = Literal["k1", "k2", "k3"]
Aggregation = Literal["token", "mean", "sum", "max"]


class Rejection(BaseModel):
    """Keep a token (`agg: token`) or a response whose KL estimate lies in [low, high]."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kl: KLEstimate = Field("k1", description="k1 = −log c (signed), k2 = ½ (log c)², k3 = c − 1 − log c")
    agg: Aggregation = Field("mean", description="token: each token; mean | sum | max: over the response")
    low: float | None = Field(None, allow_inf_nan=False, description="lower bound (k1 only: the others are ≥ 0)")
    high: float = Field(..., allow_inf_nan=False, description="upper bound")

    @model_validator(mode="after")
    def _bounds(self) -> Rejection:
        if self.low is not None and self.kl != "k1":
            raise ValueError(f"a lower bound only applies to the signed k1, not {self.kl} (which is never negative)")
        if self.low is not None and self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}")
        return self


class CorrectionConfig(BaseModel):
    """The `correction:` section: how the behaviour factor c = π_old / μ weights each token."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    level: Level | None = Field(None, description="token | sequence | geometric | prefix_min | prefix; null: no weight")
    action: Action = Field("truncate", description="truncate: clamp w to [low, high]; mask: zero w outside it")
    low: float | None = Field(None, ge=0.0, allow_inf_nan=False, description="lower bound of w (null: none)")
    high: float | None = Field(2.0, gt=0.0, allow_inf_nan=False, description="upper bound of w (null: none)")
    reject: list[Rejection] = Field(default_factory=list, description="KL-estimate rejection rules, all must pass")
    veto_low: float | None = Field(None, ge=0.0, allow_inf_nan=False, description="drop a response with a c_t below")
    veto_high: float | None = Field(None, gt=0.0, allow_inf_nan=False, description="drop a response with a c_t above")
    opsm_delta: float | None = Field(
        None, allow_inf_nan=False, description="drop a negative-advantage response whose mean log(μ/π_θ) exceeds δ"
    )
    metrics_only: bool = Field(False, description="measure everything, weight nothing (W ≡ 1)")

    @model_validator(mode="after")
    def _band(self) -> CorrectionConfig:
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"correction.low {self.low} is above correction.high {self.high}")
        return self

    @property
    def enabled(self) -> bool:
        return bool(
            self.level or self.reject or self.veto_low is not None or self.veto_high is not None
            or self.opsm_delta is not None or self.metrics_only
        )  # fmt: skip


@dataclass
class Corrected:
    """One batch's correction: the detached weight W (B, T), w before and after its bounds,
    and which trained tokens were truncated, masked (by the band) or rejected (by a rule)."""

    weights: torch.Tensor
    raw: torch.Tensor
    bounded: torch.Tensor
    truncated: torch.Tensor
    masked: torch.Tensor
    rejected: torch.Tensor


def log_behavior_factor(anchor: torch.Tensor, behavior: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log c_t = log π_old − log μ, clamped to ±20; 0 off the mask."""
    log_c = (anchor.detach() - behavior.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.where(mask, log_c, torch.zeros_like(log_c))


def level_log_weight(log_c: torch.Tensor, mask: torch.Tensor, level: Level) -> torch.Tensor:
    """log w_t of the importance weight at `level` (formulas in the module docstring)."""
    if level == "token":
        return log_c
    if level == "prefix_min":
        log_w = log_min_prefix_ratio(log_c, mask) + log_c
    elif level == "prefix":
        log_w = log_prefix_ratio(log_c, mask)
    else:
        total = log_c.sum(-1, keepdim=True)
        if level == "geometric":
            total = total / mask.sum(-1, keepdim=True).clamp(min=1)
        log_w = total.expand_as(log_c)
    return log_w.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def kl_estimate(log_c: torch.Tensor, kind: KLEstimate) -> torch.Tensor:
    """Per-token KL(μ ‖ π_old) estimates from log c = log π_old − log μ on tokens drawn from μ."""
    if kind == "k1":
        return -log_c
    if kind == "k2":
        return 0.5 * log_c**2
    return log_c.exp() - 1.0 - log_c


def rejection_keep(log_c: torch.Tensor, mask: torch.Tensor, rule: Rejection) -> torch.Tensor:
    """Tokens (B, T) that `rule` keeps: each token, or each response as a whole."""
    stat = kl_estimate(log_c, rule.kl)
    if rule.agg != "token":
        if rule.agg == "max":
            stat = stat.masked_fill(~mask, -torch.inf).amax(-1, keepdim=True)
        else:
            stat = torch.where(mask, stat, 0.0).sum(-1, keepdim=True)
            if rule.agg == "mean":
                stat = stat / mask.sum(-1, keepdim=True).clamp(min=1)
        stat = stat.expand_as(log_c)
    keep = stat <= rule.high
    return keep & (stat >= rule.low) if rule.low is not None else keep


def sequence_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, 1) advantage of each response: itself, or the mean of per-token advantages."""
    if advantages.dim() == 1:
        return advantages[:, None]
    return (torch.where(mask, advantages, 0.0).sum(-1) / mask.sum(-1).clamp(min=1))[:, None]


def keep_mask(
    cfg: CorrectionConfig,
    log_c: torch.Tensor,
    behavior: torch.Tensor,
    current: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Tokens (B, T) that every rejection rule, the veto and OPSM keep."""
    keep = torch.ones_like(mask)
    for rule in cfg.reject:
        keep &= rejection_keep(log_c, mask, rule)
    if cfg.veto_low is not None or cfg.veto_high is not None:
        c = log_c.exp()
        outside = torch.zeros_like(mask)
        if cfg.veto_low is not None:
            outside |= c < cfg.veto_low
        if cfg.veto_high is not None:
            outside |= c > cfg.veto_high
        keep &= ~(outside & mask).any(-1, keepdim=True)
    if cfg.opsm_delta is not None:
        gap = torch.where(mask, behavior.detach() - current.detach(), 0.0).sum(-1, keepdim=True)
        mean_gap = gap / mask.sum(-1, keepdim=True).clamp(min=1)
        keep &= ~((sequence_advantages(advantages, mask) < 0) & (mean_gap > cfg.opsm_delta))
    return keep


def correct(
    cfg: CorrectionConfig,
    anchor: torch.Tensor,
    behavior: torch.Tensor,
    current: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
) -> Corrected:
    """The weight W_t = w_t · keep_t of every token (1 off the mask; no grad)."""
    mask = mask.bool()
    log_c = log_behavior_factor(anchor, behavior, mask)
    if cfg.level is None:
        raw = bounded = torch.ones_like(log_c)
    else:
        raw = level_log_weight(log_c, mask, cfg.level).exp()
        if cfg.action == "truncate":
            bounded = raw.clamp(min=cfg.low, max=cfg.high)
        else:
            inside = torch.ones_like(mask)
            if cfg.low is not None:
                inside &= raw >= cfg.low
            if cfg.high is not None:
                inside &= raw <= cfg.high
            bounded = torch.where(inside, raw, 0.0)
    keep = keep_mask(cfg, log_c, behavior, current, advantages, mask)
    weights = torch.where(mask & keep, bounded, torch.where(mask, 0.0, 1.0))
    return Corrected(
        weights=torch.ones_like(weights) if cfg.metrics_only else weights,
        raw=raw,
        bounded=bounded,
        truncated=mask & (bounded != raw) & (bounded != 0) if cfg.action == "truncate" else torch.zeros_like(mask),
        masked=mask & (bounded == 0) & (raw != 0) if cfg.action == "mask" else torch.zeros_like(mask),
        rejected=mask & ~keep,
    )


def scale_gradient(logprobs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`logprobs` with its value unchanged and the gradient reaching each token scaled by W_t:
    the objective computes its ratios and clips from the same numbers, and every token's
    policy-gradient term is multiplied by W_t (for an objective whose per-token loss depends
    on its own token, exactly the gradient of Σ W_t ℓ_t). x − sg[x] is exactly 0 in value."""
    scaled = logprobs * (weights.to(logprobs.dtype) - 1.0)
    return logprobs + (scaled - scaled.detach())


# --- per-step metrics ------------------------------------------------------------------------


def _summary(prefix: str, values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean, extremes and STEP_QUANTILES of a 1-d float64 tensor of weights."""
    out = {f"{prefix}_mean": values.mean(), f"{prefix}_min": values.min(), f"{prefix}_max": values.max()}
    return out | {f"{prefix}_p{round(q * 100)}": v for q, v in zip(STEP_QUANTILES, quantiles(values))}


@dataclass
class FactorTally:
    """One optimizer step's tokens of one factor f (mismatch, staleness or drift) as log f,
    kept on the device and reduced once per step:

        kl_k1 = E[−log f]   kl_k3 = E[f − 1 − log f]   chi2_token = E[f²] − 1   chi2_seq = E[F²] − 1
        ess_token = E[f]² / E[f²]   ess_seq likewise with F = ∏_t f_t per response (log F clamped ±20)
        log_ppl_diff = E_responses[(1/|o|) Σ_t log f_t] (the log-perplexity of the denominator policy
        minus that of the numerator's), log_ppl_abs_diff its absolute value's mean."""

    tokens: list[torch.Tensor]
    sums: list[torch.Tensor]
    means: list[torch.Tensor]

    @classmethod
    def empty(cls) -> FactorTally:
        return cls([], [], [])

    def add(self, log_f: torch.Tensor, mask: torch.Tensor) -> None:
        mask = mask.bool()
        log_f = torch.where(mask, log_f.detach().double(), 0.0)
        rows = mask.any(-1)
        self.tokens.append(log_f[mask])
        self.sums.append(log_f.sum(-1)[rows])
        self.means.append((log_f.sum(-1) / mask.sum(-1).clamp(min=1))[rows])

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        logs = torch.cat(self.tokens) if self.tokens else torch.zeros(0, dtype=torch.float64)
        if logs.numel() == 0:
            return {}
        f = logs.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
        big = torch.cat(self.sums).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
        means = torch.cat(self.means)
        return _summary(f"{prefix}/ratio", f) | {
            f"{prefix}/kl_k1": (-logs).mean(),
            f"{prefix}/kl_k3": (f - 1.0 - logs).mean(),
            f"{prefix}/chi2_token": (f**2).mean() - 1.0,
            f"{prefix}/chi2_seq": (big**2).mean() - 1.0,
            f"{prefix}/ess_token": f.mean() ** 2 / (f**2).mean(),
            f"{prefix}/ess_seq": big.mean() ** 2 / (big**2).mean(),
            f"{prefix}/log_ppl_diff": means.mean(),
            f"{prefix}/log_ppl_abs_diff": means.abs().mean(),
        }


@dataclass
class CorrectionTally:
    """One optimizer step's correction weights: w before and after its bounds, W, and the
    fractions of trained tokens (and responses) truncated, masked and rejected."""

    raw: list[torch.Tensor]
    bounded: list[torch.Tensor]
    final: list[torch.Tensor]
    flags: list[torch.Tensor]  # (n, 3): truncated, masked, rejected
    rejected_rows: list[torch.Tensor]

    @classmethod
    def empty(cls) -> CorrectionTally:
        return cls([], [], [], [], [])

    def add(self, corrected: Corrected, mask: torch.Tensor) -> None:
        mask = mask.bool()
        self.raw.append(corrected.raw[mask].double())
        self.bounded.append(corrected.bounded[mask].double())
        self.final.append(corrected.weights[mask].double())
        flags = torch.stack([corrected.truncated, corrected.masked, corrected.rejected], dim=-1)
        self.flags.append(flags[mask].double())
        self.rejected_rows.append(corrected.rejected.any(-1)[mask.any(-1)].double())

    def tensors(self) -> dict[str, torch.Tensor]:
        if not self.raw or sum(part.numel() for part in self.raw) == 0:
            return {}
        final = torch.cat(self.final)
        fractions = torch.cat(self.flags).mean(0)
        return {
            **_summary("correction/weight_before_bounds", torch.cat(self.raw)),
            **_summary("correction/weight_after_bounds", torch.cat(self.bounded)),
            "correction/weight_mean": final.mean(),
            "correction/ess_token": final.mean() ** 2 / (final**2).mean().clamp(min=1e-300),
            "correction/truncated_frac": fractions[0],
            "correction/masked_frac": fractions[1],
            "correction/rejected_frac": fractions[2],
            "correction/rejected_seq_frac": torch.cat(self.rejected_rows).mean(),
        }
