"""CTPO's policy losses as its authors wrote them: a test fixture, not part of minpro.

Vendored from horizon-llm/CTPO, commit acc40211dbeaa8cb37c2347a8b7ad64192b635c4,
verl/trainer/ppo/core_algos.py (Apache License 2.0, Copyright the verl authors and the CTPO
authors; https://www.apache.org/licenses/LICENSE-2.0): `agg_loss`,
`_compute_policy_loss_cum_token_impl` (loss modes cum-token-cumprod and cum-token-geomean) and
`_compute_policy_loss_cum_token_la_impl` (cum-token-cumprod-la, cum-token-geomean-la), and
verl's `compute_policy_loss_geo_mean` (GMPO, "adapted from callsys/GMPO") as this verl fork has it.
The lines that compute the loss are verbatim; each function ends at its loss (the diagnostic
metrics after it are cut). `verl_F` and `ActorConfig` are the smallest stand-ins that these lines use.
"""

# ruff: noqa
from typing import Any, Optional

import torch


class verl_F:
    """verl/utils/torch_functional.py at the same commit: masked_sum, masked_mean."""

    @staticmethod
    def masked_sum(values, mask, axis=None):
        valid_values = torch.where(mask.bool(), values, 0.0)
        return (valid_values * mask).sum(axis=axis)

    @staticmethod
    def masked_mean(values, mask, axis=None):
        s = verl_F.masked_sum(values, mask, axis)
        return s / (mask.sum(axis=axis) + 1e-8)


class AlgoConfig:
    """Only for `isinstance` (geo_mean asserts it is not given one)."""


class ActorConfig(dict):
    """verl's actor config: attributes, `.get`, and `global_batch_info` (empty: one rank, local counts)."""

    def __getattr__(self, name):
        return self[name]

    @property
    def global_batch_info(self):
        return {}


def agg_loss(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_agg_mode: str,
    dp_size: int = 1,
    batch_num_tokens: Optional[int] = None,
    global_batch_size: Optional[int] = None,
    loss_scale_factor: Optional[int] = None,
):
    """
    Aggregate the loss across global batch to ensure the loss is invariant to fsdp/megatron parallelism.

    NOTE: The returned loss has different behaviors for different backend:
    - FSDP: the loss is directly used for backward.
    - Megatron: the loss should be scaled by `num_microbatches` and `cp_size` for pp schedule.

    Args:
        loss_mat: micro batch loss matrix, (bs, response_length)
        loss_mask: micro batch loss mask, (bs, response_length)
        loss_agg_mode: method to aggregate the loss matrix into a scalar
        dp_size: data parallel size
        batch_num_tokens: number of valid tokens in global batch
        global_batch_size: global batch size
        loss_scale_factor: scale factor for "seq-mean-token-sum-norm" mode. If None, uses loss_mask.shape[-1].
            Set this to a constant value to ensure consistent normalization throughout training.

    Returns:
        loss: `a scalar torch.Tensor`
            aggregated loss
    """
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            batch_num_tokens = loss_mask.sum()
        if torch.is_tensor(batch_num_tokens):
            denom = batch_num_tokens.clamp(min=1)
        else:
            denom = max(batch_num_tokens, 1)
        loss = verl_F.masked_sum(loss_mat, loss_mask) / denom * dp_size
    elif loss_agg_mode == "seq-mean-token-sum":
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)  # token-sum
        seq_mask = (torch.sum(loss_mask, dim=-1) > 0).float()  # exclude fully masked sequences
        if global_batch_size is None:
            global_batch_size = seq_mask.sum()
        if torch.is_tensor(global_batch_size):
            denom = global_batch_size.clamp(min=1)
        else:
            denom = max(global_batch_size, 1)
        loss = verl_F.masked_sum(seq_losses, seq_mask) / denom * dp_size  # seq-mean
    elif loss_agg_mode == "seq-mean-token-mean":
        seq_mask = torch.sum(loss_mask, dim=-1)  # per-sequence token count
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1) / (seq_mask + 1e-8)  # token-mean
        seq_mask = (seq_mask > 0).float()  # exclude fully masked sequences
        if global_batch_size is None:
            global_batch_size = seq_mask.sum()
        if torch.is_tensor(global_batch_size):
            denom = global_batch_size.clamp(min=1)
        else:
            denom = max(global_batch_size, 1)
        loss = verl_F.masked_sum(seq_losses, seq_mask) / denom * dp_size  # seq-mean
    elif loss_agg_mode == "seq-mean-token-sum-norm":
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)
        if loss_scale_factor is None:
            loss_scale_factor = loss_mask.shape[-1]
        loss = torch.sum(seq_losses) / loss_scale_factor
    else:
        raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")

    return loss


def _compute_policy_loss_cum_token_impl(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Optional[ActorConfig] = None,
    rollout_is_weights: torch.Tensor | None = None,
    ratio_mode: str = "geomean",
) -> tuple[torch.Tensor, dict[str, Any]]:
    """
    Compute PPO objective using cumulative-token importance ratio.

    Compute CTPO loss with configurable cumulative ratio mode.
    - geomean: exp(mean_{<=t}(log π - log π_old))
    - cumprod: exp(sum_{<=t}(log π - log π_old))
    """

    assert config is not None
    assert isinstance(config, ActorConfig)
    clip_ratio = config.clip_ratio
    clip_ratio_low = config.clip_ratio_low if config.clip_ratio_low is not None else clip_ratio
    clip_ratio_high = config.clip_ratio_high if config.clip_ratio_high is not None else clip_ratio
    clip_ratio_c = config.get("clip_ratio_c", 3.0)

    assert clip_ratio_c > 1.0, (
        "The lower bound of the clip_ratio_c for dual-clip PPO should be greater than 1.0,"
        + f" but get the value: {clip_ratio_c}."
    )

    negative_approx_kl = log_prob - old_log_prob
    negative_approx_kl = torch.clamp(negative_approx_kl, min=-20.0, max=20.0)

    mask = response_mask.to(dtype=negative_approx_kl.dtype)
    cumulative_sum = torch.cumsum(negative_approx_kl * mask, dim=-1)
    if ratio_mode == "geomean":
        cumulative_count = torch.cumsum(mask, dim=-1).clamp(min=1.0)
        kl_values = torch.where(mask > 0, cumulative_sum / cumulative_count, torch.zeros_like(cumulative_sum))
    elif ratio_mode == "cumprod":
        kl_values = torch.where(mask > 0, cumulative_sum, torch.zeros_like(cumulative_sum))
    else:
        raise ValueError(f"Unsupported cum-token ratio mode: {ratio_mode}")

    # Stop-gradient decomposition used by sequence/cum-token style losses.
    log_importance_ratio = kl_values.detach() + log_prob - log_prob.detach()
    log_importance_ratio = torch.clamp(log_importance_ratio, max=10.0)
    ratio = torch.where(mask > 0, torch.exp(log_importance_ratio), torch.zeros_like(log_importance_ratio))

    ppo_kl = verl_F.masked_mean(-negative_approx_kl, response_mask)

    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = verl_F.masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)

    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = verl_F.masked_mean(
        torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).float(), response_mask
    )

    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)

    # Apply rollout correction weights if provided.
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights

    pg_loss = agg_loss(
        loss_mat=pg_losses, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **config.global_batch_info
    )
    return pg_loss


def _compute_policy_loss_cum_token_la_impl(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Optional[ActorConfig] = None,
    rollout_is_weights: torch.Tensor | None = None,
    ratio_mode: str = "cumprod",
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Length-adaptive CTPO loss with log-space clipping that scales with position.

    ``la_clip_high``, ``la_clip_low``, and ``la_clip_c`` are **log-space**
    base values (e.g. 0.05 / 0.03 / 0.05).  At token position *t* they are
    multiplied by ``t ** la_power``:

    * t=1: clip window ≈ [exp(-la_clip_low), exp(la_clip_high)] — tight
    * t grows: window widens in proportion to cumulative ratio variance
    * la_power=0: uniform clip identical to original CTPO-style loss

    Configured via ``actor.la_clip_high``, ``actor.la_clip_low``,
    ``actor.la_clip_c``, and ``actor.clip_ratio_la_power``.
    """

    assert config is not None
    assert isinstance(config, ActorConfig)
    # la_clip_* are LOG-SPACE base values, not ratio-space.
    la_clip_low:  float = config.get("la_clip_low",  0.025)
    la_clip_high: float = config.get("la_clip_high", 0.05)
    la_clip_c:    float = config.get("la_clip_c",    0.05)
    la_power:     float = config.get("clip_ratio_la_power", 0.5)

    assert la_clip_low  > 0, f"la_clip_low must be positive, got {la_clip_low}"
    assert la_clip_high > 0, f"la_clip_high must be positive, got {la_clip_high}"
    assert la_clip_c    > 0, f"la_clip_c must be positive, got {la_clip_c}"

    # ---- cumulative importance ratio (same as original CTPO) ---------------
    negative_approx_kl = log_prob - old_log_prob
    negative_approx_kl = torch.clamp(negative_approx_kl, min=-20.0, max=20.0)

    mask = response_mask.to(dtype=negative_approx_kl.dtype)
    cumulative_sum = torch.cumsum(negative_approx_kl * mask, dim=-1)
    if ratio_mode == "geomean":
        cumulative_count = torch.cumsum(mask, dim=-1).clamp(min=1.0)
        kl_values = torch.where(mask > 0, cumulative_sum / cumulative_count, torch.zeros_like(cumulative_sum))
    elif ratio_mode == "cumprod":
        kl_values = torch.where(mask > 0, cumulative_sum, torch.zeros_like(cumulative_sum))
    else:
        raise ValueError(f"Unsupported cum-token ratio mode: {ratio_mode}")

    # Stop-gradient decomposition (same as original CTPO).
    log_importance_ratio = kl_values.detach() + log_prob - log_prob.detach()
    log_importance_ratio = torch.clamp(log_importance_ratio, max=10.0)
    ratio = torch.where(mask > 0, torch.exp(log_importance_ratio), torch.zeros_like(log_importance_ratio))

    ppo_kl = verl_F.masked_mean(-negative_approx_kl, response_mask)

    # ---- absolute 1-indexed position within response -----------------------
    pos_t = torch.cumsum(mask, dim=-1)  # [batch, seq_len], 0 for padding

    # ---- position-scaled log-space clip bounds ----------------------------
    if la_power != 0.0:
        scale = pos_t.clamp(min=1.0).pow(la_power)        # [batch, seq_len]
        adaptive_log_clip_low  = la_clip_low  * scale
        adaptive_log_clip_high = la_clip_high * scale
        adaptive_log_clip_c    = la_clip_c    * scale
    else:
        adaptive_log_clip_low  = la_clip_low
        adaptive_log_clip_high = la_clip_high
        adaptive_log_clip_c    = la_clip_c

    # ---- clipped ratio (log-space clamp → ratio always > 0) ---------------
    log_r_clipped = torch.clamp(log_importance_ratio, -adaptive_log_clip_low, adaptive_log_clip_high)
    clipped_ratio = torch.where(mask > 0, torch.exp(log_r_clipped), torch.zeros_like(log_r_clipped))

    # Dual-clip threshold grows with position: exp(la_clip_c · t^p)
    dual_clip_threshold = torch.where(
        mask > 0, torch.exp(adaptive_log_clip_c), torch.ones_like(adaptive_log_clip_c)
    )

    # ---- clipped surrogate objective --------------------------------------
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * clipped_ratio
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = verl_F.masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)

    pg_losses3 = -advantages * dual_clip_threshold
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = verl_F.masked_mean(
        torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).float(), response_mask
    )

    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)

    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights

    pg_loss = agg_loss(
        loss_mat=pg_losses, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **config.global_batch_info
    )
    return pg_loss


def compute_policy_loss_geo_mean(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Optional[ActorConfig] = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """
    Compute the clipped policy objective and related metrics for GMPO.

    Adapted from paper https://arxiv.org/abs/2507.20673
    https://github.com/callsys/GMPO/blob/main/train_zero_math_gmpo.py

    Args:
        old_log_prob (torch.Tensor):
            Log-probabilities of actions under the old policy, shape (batch_size, response_length).
        log_prob (torch.Tensor):
            Log-probabilities of actions under the current policy, shape (batch_size, response_length).
        advantages (torch.Tensor):
            Advantage estimates for each action, shape (batch_size, response_length).
        response_mask (torch.Tensor):
            Mask indicating which tokens to include in the loss, shape (batch_size, response_length).
        loss_agg_mode (str, optional):
            not used
    """

    assert config is not None
    assert not isinstance(config, AlgoConfig)
    clip_ratio = config.clip_ratio  # Clipping parameter. See https://arxiv.org/abs/1707.06347.
    clip_ratio_low = config.clip_ratio_low if config.clip_ratio_low is not None else clip_ratio
    clip_ratio_high = config.clip_ratio_high if config.clip_ratio_high is not None else clip_ratio

    cliprange = clip_ratio
    cliprange_low = clip_ratio_low
    cliprange_high = clip_ratio_high
    if cliprange_low is None:
        cliprange_low = cliprange
    if cliprange_high is None:
        cliprange_high = cliprange

    negative_approx_kl = log_prob - old_log_prob
    # Clamp negative_approx_kl for stability (uncomment it if you like)
    # negative_approx_kl = torch.clamp(negative_approx_kl, min=-20.0, max=20.0)
    ppo_kl = verl_F.masked_mean(-negative_approx_kl, response_mask)

    # Clipping at token-level & Clipping wider
    sgn_advantage = torch.sign(advantages)
    negative_approx_kl_clamp = torch.clamp(negative_approx_kl, -cliprange_low, cliprange_high)
    negative_approx_kl_min = torch.min(sgn_advantage * negative_approx_kl, sgn_advantage * negative_approx_kl_clamp)
    negative_approx_kl_min = sgn_advantage * negative_approx_kl_min

    # Geometric-Mean Policy Optimization
    response_mask_sum = response_mask.sum(dim=-1)
    ratio = torch.exp((negative_approx_kl_min * response_mask).sum(dim=-1) / (response_mask_sum + 1e-8))
    # we only support sequence level advantage for now,
    # otherwise, below would be not consistent with the paper
    advantage = (advantages * response_mask).sum(dim=-1) / (response_mask_sum + 1e-8)
    pg_losses = -advantage * ratio

    # Apply rollout correction weights if provided
    # For geo_mean, IS weights are 2D (batch_size, seq_length) and need to be aggregated to sequence level
    if rollout_is_weights is not None:
        # Aggregate token-level weights to sequence level using geometric mean for consistency
        # Note: rollout_is_weights is always 2D regardless of aggregation mode
        seq_is_weights = torch.exp(
            (torch.log(rollout_is_weights + 1e-10) * response_mask).sum(dim=-1) / (response_mask_sum + 1e-8)
        )
        pg_losses = pg_losses * seq_is_weights

    pg_loss = torch.mean(pg_losses)
    return pg_loss
