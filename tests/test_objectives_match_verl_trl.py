"""Same inputs, same loss (and gradient) as verl and TRL, for the objectives they also ship.

Neither library is installed in tests (no network, no heavy deps): each reference below is a
transcription of the public code, with the formula written out and the source named.
  verl: verl/trainer/ppo/core_algos.py — agg_loss, compute_policy_loss_vanilla,
        compute_policy_loss_gspo, compute_policy_loss_cispo
  TRL:  trl/trainer/grpo_trainer.py — GRPOTrainer._compute_loss (v1.16), loss_type ∈
        {grpo, dapo, dr_grpo, cispo}, importance_sampling_level="sequence" (GSPO)
"""

from __future__ import annotations

import pytest
import torch

from minpro_cli.objectives import ObjectiveInputs
from minpro_cli.registry import load_objective


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded responses (every row non-empty, as both libraries assume), per-sequence Â."""
    gen = torch.Generator().manual_seed(seed)
    logp = -2 * torch.rand(5, 8, generator=gen, dtype=torch.float64)
    old = logp + 0.4 * torch.randn(5, 8, generator=gen, dtype=torch.float64)
    mask = torch.arange(8)[None, :] < torch.tensor([8, 3, 6, 1, 5])[:, None]
    adv = torch.randn(5, generator=gen, dtype=torch.float64)
    return logp, old, adv, mask


def ours(name: str, logp, old, adv, mask, **options) -> tuple[float, torch.Tensor]:
    x = logp.clone().requires_grad_(True)
    loss = load_objective(name, **options)(ObjectiveInputs(x, old, adv, mask)).loss
    loss.backward()
    return loss.item(), x.grad


def theirs(fn, logp, old, adv, mask, **kwargs) -> tuple[float, torch.Tensor]:
    x = logp.clone().requires_grad_(True)
    loss = fn(x, old, adv[:, None].expand_as(logp), mask.double(), **kwargs)
    loss.backward()
    return loss.item(), x.grad


def assert_same(a: tuple[float, torch.Tensor], b: tuple[float, torch.Tensor]) -> None:
    assert a[0] == pytest.approx(b[0], rel=1e-10)
    torch.testing.assert_close(a[1], b[1], rtol=1e-10, atol=1e-12)


# --- verl ---------------------------------------------------------------------------------


def verl_agg_loss(loss_mat, loss_mask, mode):
    """token-mean: Σ ℓ·m / Σ m; seq-mean-token-sum: mean_i Σ_t ℓ·m; seq-mean-token-mean:
    mean_i (Σ_t ℓ·m / Σ_t m); seq-mean-token-sum-norm: Σ_i Σ_t ℓ·m / T (T = mask width)."""
    if mode == "token-mean":
        return (loss_mat * loss_mask).sum() / loss_mask.sum()
    seq = (loss_mat * loss_mask).sum(-1)
    if mode == "seq-mean-token-sum":
        return seq.mean()
    if mode == "seq-mean-token-mean":
        return (seq / loss_mask.sum(-1)).mean()
    return seq.sum() / loss_mask.shape[-1]


def verl_vanilla(log_prob, old_log_prob, advantages, mask, clip_low, clip_high, clip_ratio_c, mode):
    """ρ = exp(clamp(log π − log μ, ±20)); ℓ = max(−Aρ, −A·clip(ρ, 1−ε_l, 1+ε_h));
    for A < 0: ℓ = min(ℓ, −A·c)."""
    ratio = torch.exp(torch.clamp(log_prob - old_log_prob, -20.0, 20.0))
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clip1 = torch.maximum(pg1, pg2)
    clip2 = torch.min(-advantages * clip_ratio_c, clip1)
    return verl_agg_loss(torch.where(advantages < 0, clip2, clip1), mask, mode)


def verl_gspo(log_prob, old_log_prob, advantages, mask, clip_low, clip_high):
    """log s_i = Σ_t m·(log π − log μ) / Σ_t m;  log s_it = log π − sg[log π] + sg[log s_i];
    ℓ = max(−A·s_it, −A·clip(s_it)); seq-mean-token-mean."""
    seq_kl = ((log_prob - old_log_prob) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    log_s = log_prob - log_prob.detach() + seq_kl.detach().unsqueeze(-1)
    ratio = torch.exp(torch.clamp(log_s, max=10.0))
    loss = torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high))
    return verl_agg_loss(loss, mask, "seq-mean-token-mean")


def verl_cispo(log_prob, old_log_prob, advantages, mask, clip_low, clip_high, mode):
    """ℓ = −sg[clip(ρ, 1−ε_l, 1+ε_h)]·A·log π."""
    ratio = torch.exp(torch.clamp(log_prob - old_log_prob, -20.0, 20.0))
    return verl_agg_loss(-torch.clamp(ratio, 1 - clip_low, 1 + clip_high).detach() * advantages * log_prob, mask, mode)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("dual_clip", [None, 1.5])
def test_grpo_is_verl_vanilla_policy_loss(mode, dual_clip):
    logp, old, adv, mask = batch(0)
    c = dual_clip if dual_clip is not None else 1e9  # verl always applies c (default 3); ∞ is off
    assert_same(
        ours("grpo", logp, old, adv, mask, eps_low=0.2, eps_high=0.28, loss_agg=mode, dual_clip=dual_clip),
        theirs(verl_vanilla, logp, old, adv, mask, clip_low=0.2, clip_high=0.28, clip_ratio_c=c, mode=mode),
    )


def test_constant_normaliser_is_verl_seq_mean_token_sum_norm_over_batch_size():
    """verl divides Σ_i Σ_t ℓ by T only; we (and TRL) divide by B·T: a factor of B apart."""
    logp, old, adv, mask = batch(1)
    our_loss, our_grad = ours("dr_grpo", logp, old, adv, mask)
    verl_loss, verl_grad = theirs(verl_vanilla, logp, old, adv, mask, clip_low=0.2, clip_high=0.2,
                                  clip_ratio_c=1e9, mode="seq-mean-token-sum-norm")
    assert_same((our_loss * 5, our_grad * 5), (verl_loss, verl_grad))


def test_gspo_is_verl_gspo():
    logp, old, adv, mask = batch(2)
    assert_same(
        ours("gspo", logp, old, adv, mask, eps_low=0.05, eps_high=0.05),
        theirs(verl_gspo, logp, old, adv, mask, clip_low=0.05, clip_high=0.05),
    )


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_cispo_is_verl_cispo(mode):
    logp, old, adv, mask = batch(3)
    assert_same(
        ours("cispo", logp, old, adv, mask, eps_low=10.0, eps_high=0.2, loss_agg=mode),
        theirs(verl_cispo, logp, old, adv, mask, clip_low=10.0, clip_high=0.2, mode=mode),
    )


# --- TRL ----------------------------------------------------------------------------------


def trl_loss(per_token_logps, old_per_token_logps, advantages, mask, loss_type, epsilon_low=0.2,
             epsilon_high=0.2, importance_sampling_level="token", max_completion_length=None):
    """coef_1 = exp(log w) with log w = log π − log μ (token) or its masked mean (sequence);
    cispo: ℓ = −sg[min(coef_1, ε_high)]·A·log π; others: ℓ = −min(coef_1·A, clip(coef_1)·A).
    grpo: mean_i(Σ_t ℓm/Σ_t m); dapo/cispo: Σℓm / num_items_in_batch; dr_grpo: Σℓm / (B·L)."""
    log_ratio = per_token_logps - old_per_token_logps
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_ratio)
    if loss_type == "cispo":
        per_token_loss = -torch.clamp(coef_1, max=epsilon_high).detach() * advantages * per_token_logps
    else:
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)  # num_items_in_batch, 1 process


def test_grpo_is_trl_grpo():
    logp, old, adv, mask = batch(4)
    assert_same(ours("grpo", logp, old, adv, mask),
                theirs(trl_loss, logp, old, adv, mask, loss_type="grpo"))


def test_dapo_is_trl_dapo():
    logp, old, adv, mask = batch(5)
    assert_same(ours("dapo", logp, old, adv, mask),
                theirs(trl_loss, logp, old, adv, mask, loss_type="dapo", epsilon_high=0.28))


def test_dr_grpo_is_trl_dr_grpo():
    logp, old, adv, mask = batch(6)
    assert_same(ours("dr_grpo", logp, old, adv, mask, max_response_length=16),
                theirs(trl_loss, logp, old, adv, mask, loss_type="dr_grpo", max_completion_length=16))


def test_cispo_absolute_cap_is_eps_high_minus_one():
    """TRL caps min(ρ, ε_max) (default 5): eps_low ≥ 1 (no lower bound), eps_high = ε_max − 1."""
    logp, old, adv, mask = batch(7)
    old = logp + 1.2 * (old - logp)  # wide ratios so the cap binds
    assert_same(ours("cispo", logp, old, adv, mask, eps_low=1.0, eps_high=0.5),
                theirs(trl_loss, logp, old, adv, mask, loss_type="cispo", epsilon_high=1.5))


@pytest.mark.parametrize("mode,trl_type", [("seq-mean-token-mean", "grpo"), ("token-mean", "dapo")])
def test_gspo_token_has_the_gradient_of_trl_sequence_level(mode, trl_type):
    """With a per-sequence Â, GSPO-token's value and gradient equal TRL's sequence-level
    importance sampling, where the gradient flows through the mean log-ratio itself."""
    logp, old, adv, mask = batch(8)
    assert_same(ours("gspo", logp, old, adv, mask, eps_low=0.03, eps_high=0.04, loss_agg=mode),
                theirs(trl_loss, logp, old, adv, mask, loss_type=trl_type, epsilon_low=0.03, epsilon_high=0.04,
                       importance_sampling_level="sequence"))
