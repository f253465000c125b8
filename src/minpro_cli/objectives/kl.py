"""Per-token estimators of KL(π_θ ‖ π_ref) for the KL penalty (`train.kl_coef`).

With r = π_ref(o_t) / π_θ(o_t) at a sampled token (Schulman, "Approximating KL divergence"):

    k1 = −log r = log π_θ − log π_ref          unbiased, high variance, can be negative
    k2 = ½ (log r)²                            biased, low variance, ≥ 0
    k3 = r − 1 − log r                         unbiased, low variance, ≥ 0 (verl's low_var_kl, TRL's)

As in verl, log r is clamped to ±20 (exp stays finite) and k3 to at most 10 (one token of a
drifted response cannot dominate the penalty). Gradients flow through `logprobs` only.
"""

from __future__ import annotations

from typing import Literal

import torch

from minpro_cli.objectives import LOG_RATIO_CLAMP

KLEstimator = Literal["k1", "k2", "k3"]
K3_MAX = 10.0


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    """The per-token estimate (same shape as `logprobs`); `ref_logprobs` carries no gradient."""
    log_r = (ref_logprobs.detach() - logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r.square()
    if estimator == "k3":
        return (log_r.exp() - 1.0 - log_r).clamp(max=K3_MAX)
    raise ValueError(f"unknown KL estimator {estimator!r}: use k1, k2 or k3")
