"""MinPRO's rivals against their authors' own code: same tensors (float64, padded rows, every
loss_agg the authors support), same loss and gradient.

References (tests/reference/, each with its source, commit and license):
  CTPO, CTPO-LA, PNPO: horizon-llm/CTPO verl/trainer/ppo/core_algos.py
  GMPO: verl's `geo_mean` (adapted from callsys/GMPO), from the same file of that verl fork
  DPPO (Binary-TV, Binary-KL): verl's `dppo_tv`, `dppo_kl` (added by DPPO's authors), verl-project/verl
  CE-GPPO: Kwai-Klear/CE-GPPO verl/trainer/ppo/core_algos.py `compute_gppo_loss_general_beta`
  CPPO: the per-token loop its authors test their verl PR (#6731) against
  TOPR: ROLL's `pg_variant: topr` (alibaba/ROLL roll/pipeline/agentic/agentic_actor_pg_worker.py)
  SAPO: verl's `sapo`, verl-project/verl
  GIPO: no code from its authors; an independent per-token loop from the paper's formula instead
"""

from __future__ import annotations

import math

import pytest
import torch
from reference import cppo_reference as cppo_code
from reference import ctpo_core_algos as ctpo_code
from reference import gppo_core_algos as gppo_code
from reference import roll_topr as topr_code
from reference import verl_core_algos as verl_code

from minpro_cli.objectives import ObjectiveInputs
from minpro_cli.registry import load_objective

AGGREGATIONS = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def batch(seed: int, drift: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded rows (one full length, so every L is the width), per-sequence Â of both signs;
    `drift` scales log π_θ − log μ: 0.4 stays near the clip band, 3 crosses the cap of 10."""
    gen = torch.Generator().manual_seed(seed)
    logp = -2 * torch.rand(6, 12, generator=gen, dtype=torch.float64)
    old = logp + drift * torch.randn(6, 12, generator=gen, dtype=torch.float64)
    mask = torch.arange(12)[None, :] < torch.tensor([12, 3, 7, 1, 10, 5])[:, None]
    adv = torch.tensor([1.3, -0.7, 0.4, -1.9, -0.2, 0.9], dtype=torch.float64)
    return logp, old, adv, mask


def ours(name: str, logp, old, adv, mask, rewards=None, **options) -> tuple[float, torch.Tensor]:
    x = logp.clone().requires_grad_(True)
    extra = {"max_response_length": mask.shape[1]} if options.get("loss_agg") == "seq-mean-token-sum-norm" else {}
    loss = load_objective(name, **options, **extra)(ObjectiveInputs(x, old, adv, mask, rewards=rewards)).loss
    loss.backward()
    return loss.item(), x.grad


def theirs(fn, logp, old, adv, mask, **kwargs) -> tuple[float, torch.Tensor]:
    x = logp.clone().requires_grad_(True)
    loss = fn(old, x, adv[:, None].expand_as(logp), mask.double(), **kwargs)
    loss.backward()
    return loss.item(), x.grad


def assert_same(a: tuple[float, torch.Tensor], b: tuple[float, torch.Tensor], rel: float = 1e-12) -> float:
    assert a[0] == pytest.approx(b[0], rel=rel, abs=1e-14)
    torch.testing.assert_close(a[1], b[1], rtol=rel, atol=1e-14)
    return max(abs(a[0] - b[0]), float((a[1] - b[1]).abs().max()))


def in_verl_terms(result: tuple[float, torch.Tensor], agg: str, rows: int) -> tuple[float, torch.Tensor]:
    """verl's seq-mean-token-sum-norm divides Σ_i Σ_t ℓ by T alone; minpro (and TRL) by B·T."""
    return (result[0] * rows, result[1] * rows) if agg == "seq-mean-token-sum-norm" else result


# verl's seq-mean-token-mean divides each row by its token count + 1e-8: a relative 1e-8 apart
TOLERANCE = {"seq-mean-token-mean": 1e-7}


def verl_config(**values) -> ctpo_code.ActorConfig:
    return ctpo_code.ActorConfig({"clip_ratio": 0.2, "clip_ratio_low": None, "clip_ratio_high": None,
                                  "clip_ratio_c": 3.0} | values)  # fmt: skip


CTPO_CASES = [  # (ours, options, the authors' function, its ratio mode, their config)
    ("ctpo", {}, ctpo_code._compute_policy_loss_cum_token_impl, "cumprod", {}),
    ("pnpo", {}, ctpo_code._compute_policy_loss_cum_token_impl, "geomean", {}),
    ("ctpo", {"eps_low": 0.1, "eps_high": 0.3, "dual_clip": 2.0}, ctpo_code._compute_policy_loss_cum_token_impl,
     "cumprod", {"clip_ratio_low": 0.1, "clip_ratio_high": 0.3, "clip_ratio_c": 2.0}),
    ("ctpo_la", {}, ctpo_code._compute_policy_loss_cum_token_la_impl, "cumprod", {}),
    ("ctpo_la", {"prefix_mode": "geomean", "la_power": -0.5}, ctpo_code._compute_policy_loss_cum_token_la_impl,
     "geomean", {"clip_ratio_la_power": -0.5}),
    ("ctpo_la", {"la_clip_low": 0.1, "la_clip_high": 0.2, "la_clip_c": 0.3, "la_power": 0.0},
     ctpo_code._compute_policy_loss_cum_token_la_impl, "cumprod",
     # the authors' la_power = 0 branch raises (torch.exp of a float); at p = 1e-300, t^p is exactly 1
     {"la_clip_low": 0.1, "la_clip_high": 0.2, "la_clip_c": 0.3, "clip_ratio_la_power": 1e-300}),
]  # fmt: skip


@pytest.mark.parametrize("drift", [0.4, 3.0])
@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize(("name", "options", "fn", "mode", "config"), CTPO_CASES,
                         ids=[f"{c[0]}-{c[3]}-{i}" for i, c in enumerate(CTPO_CASES)])  # fmt: skip
def test_ctpo_family_matches_the_authors_code(name, options, fn, mode, config, agg, drift):
    logp, old, adv, mask = batch(seed=len(name), drift=drift)
    got = in_verl_terms(ours(name, logp, old, adv, mask, loss_agg=agg, **options), agg, len(adv))
    want = theirs(fn, logp, old, adv, mask, loss_agg_mode=agg, config=verl_config(**config), ratio_mode=mode)
    assert_same(got, want, TOLERANCE.get(agg, 1e-12))
    assert got[1].abs().sum() > 0  # the batch moves the loss: a zero gradient would match trivially


@pytest.mark.parametrize("drift", [0.1, 0.4, 3.0])
@pytest.mark.parametrize("eps", [(0.4, 0.4), (0.2, 0.6)])
def test_gmpo_matches_verl_geo_mean(eps, drift):
    """The authors aggregate by the sequence mean only: GMPO's default `seq-mean-token-sum`."""
    logp, old, adv, mask = batch(seed=7, drift=drift)
    got = ours("gmpo", logp, old, adv, mask, eps_low=eps[0], eps_high=eps[1])
    want = theirs(ctpo_code.compute_policy_loss_geo_mean, logp, old, adv, mask,
                  config=verl_config(clip_ratio_low=eps[0], clip_ratio_high=eps[1]))  # fmt: skip
    assert_same(got, want)
    assert got[1].abs().sum() > 0


DPPO_CASES = [  # (ours, options, verl's config: clip_ratio is δ, clip_ratio_c is the truncation)
    ("dppo_tv", {}, {"clip_ratio": 0.15, "clip_ratio_c": 10000.0}),
    ("dppo_tv", {"delta_low": 0.05, "delta_high": 0.2, "truncation": 1.5},
     {"clip_ratio_low": 0.05, "clip_ratio_high": 0.2, "clip_ratio_c": 1.5}),
    ("dppo_kl", {}, {"clip_ratio": 0.05, "clip_ratio_c": 10000.0}),
    ("dppo_kl", {"delta_low": 0.02, "delta_high": 0.1, "truncation": 1.5},
     {"clip_ratio_low": 0.02, "clip_ratio_high": 0.1, "clip_ratio_c": 1.5}),
]  # fmt: skip
DPPO_CODE = {"dppo_tv": verl_code.compute_policy_loss_dppo_tv, "dppo_kl": verl_code.compute_policy_loss_dppo_kl}


@pytest.mark.parametrize("drift", [0.4, 3.0])
@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize(("name", "options", "config"), DPPO_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(DPPO_CASES)])
def test_dppo_matches_verl(name, options, config, agg, drift):
    """This verl's seq-mean-token-sum-norm divides by B'·T: minpro's B·L with no empty rows."""
    logp, old, adv, mask = batch(seed=11, drift=drift)
    got = ours(name, logp, old, adv, mask, loss_agg=agg, **options)
    want = theirs(DPPO_CODE[name], logp, old, adv, mask, loss_agg_mode=agg, config=verl_config(**config))
    assert_same(got, want, TOLERANCE.get(agg, 1e-12))
    masked = load_objective(name, **options)(ObjectiveInputs(logp, old, adv, mask)).metrics
    assert 0 < masked["masked_frac_positive"] and 0 < masked["masked_frac_negative"] and masked["masked_frac"] < 1


@pytest.mark.parametrize("drift", [0.4, 3.0])
@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize(("options", "theirs_options"), [
    ({}, {"cliprange": 0.2, "clip_ratio_c": 10.0, "gppo_loss_beta1": 0.75, "gppo_loss_beta2": 1.0}),
    ({"eps_low": 0.1, "eps_high": 0.3, "beta_low": 0.5, "beta_high": 0.25, "dual_clip": 3.0},
     {"cliprange_low": 0.1, "cliprange_high": 0.3, "clip_ratio_c": 3.0, "gppo_loss_beta1": 0.5, "gppo_loss_beta2": 0.25}),
])  # fmt: skip
def test_ce_gppo_matches_the_authors_code(options, theirs_options, agg, drift):
    """This verl's token-mean divides by the token count + 1e-8 (a relative 1e-8 apart)."""
    logp, old, adv, mask = batch(seed=5, drift=drift)
    got = in_verl_terms(ours("ce_gppo", logp, old, adv, mask, loss_agg=agg, **options), agg, len(adv))

    def authors(old, x, adv, mask, **kwargs):
        return gppo_code.compute_gppo_loss_general_beta(old, x, adv, mask, **kwargs)[0]

    want = theirs(authors, logp, old, adv, mask, loss_agg_mode=agg, **theirs_options)
    assert_same(got, want, 1e-7 if agg in ("token-mean", "seq-mean-token-mean") else 1e-12)
    clipped = load_objective("ce_gppo", **options)(ObjectiveInputs(logp, old, adv, mask)).metrics
    assert clipped["clip_frac_low"] > 0 and clipped["clip_frac_high"] > 0  # every branch is taken


def gipo_by_loop(logp, old, adv, mask, agg: str, sigma: float, rho_min: float, rho_max: float):
    """GIPO's loss and its gradient in log π_θ, one token at a time in Python floats (float64):
    ℓ = −ω·ρ·Â with ω = exp(−(log clamp(ρ))²/2σ²) held constant, so ∂ℓ/∂log π_θ = ℓ."""
    rows = [[t for t in range(mask.shape[1]) if mask[i, t]] for i in range(mask.shape[0])]
    total, grad = 0.0, torch.zeros_like(logp)
    tokens = sum(len(r) for r in rows)
    for i, kept in enumerate(rows):
        for t in kept:
            rho = math.exp(float(logp[i, t]) - float(old[i, t]))
            omega = math.exp(-math.log(min(max(rho, rho_min), rho_max)) ** 2 / (2 * sigma * sigma))
            term = -omega * rho * float(adv[i])
            scale = 1 / tokens if agg == "token-mean" else 1 / (len(kept) * len(rows))  # seq-mean-token-mean
            total += term * scale
            grad[i, t] = term * scale
    return total, grad


@pytest.mark.parametrize("drift", [0.1, 0.4, 3.0])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("options", [{}, {"sigma": 0.5, "rho_min": 0.5, "rho_max": 1.5}])
def test_gipo_matches_a_loop_from_the_paper(options, agg, drift):
    logp, old, adv, mask = batch(seed=3, drift=drift)
    got = ours("gipo", logp, old, adv, mask, loss_agg=agg, **options)
    want = gipo_by_loop(logp, old, adv, mask, agg, **({"sigma": 1.0, "rho_min": 0.0067, "rho_max": 148.0} | options))
    assert_same(got, want)
    assert got[1].abs().sum() > 0


CPPO_CASES = [  # (ours, the authors' config): δ_b_k 0 pins the budget's rate to its floor
    ({}, {}),
    ({"delta": 0.3, "w_min": 0.5, "delta_b": 0.01, "delta_b_k": 0.0, "truncation": 1.5},
     {"delta": 0.3, "w_min": 0.5, "delta_b": 0.01, "delta_b_k": 0.0, "clip_ratio_c": 1.5}),
    ({"delta": 0.08, "delta_b": 0.01, "delta_b_q": 0.5, "delta_b_k": 2.0, "delta_b_max_mult": 2.0},
     {"delta": 0.08, "delta_b": 0.01, "delta_b_q": 0.5, "delta_b_k": 2.0, "delta_b_max_mult": 2.0}),
    # a budget that never binds: the position weight alone decides (its span: each row's length)
    ({"delta": 0.1, "w_min": 0.3, "delta_b": 100.0, "delta_b_k": 0.0},
     {"delta": 0.1, "w_min": 0.3, "delta_b": 100.0, "delta_b_k": 0.0}),
]  # fmt: skip


@pytest.mark.parametrize("drift", [0.4, 3.0])
@pytest.mark.parametrize(("options", "config"), CPPO_CASES)
def test_cppo_matches_the_authors_loop(options, config, drift):
    """Mask, loss and gradient against the loop the CPPO authors check their PR with (its loss
    is seq-mean-token-mean); the mask is also checked alone, token by token."""
    logp, old, adv, mask = batch(seed=13, drift=drift)
    cfg = cppo_code.config(**config)
    token_adv = adv[:, None].expand_as(logp) * mask
    keep, _ = load_objective("cppo", **options).kept(ObjectiveInputs(logp, old, adv, mask))
    assert torch.equal(keep.double(), cppo_code._reference_mask(logp, old, token_adv, mask, cfg).double())
    got = ours("cppo", logp, old, adv, mask, loss_agg="seq-mean-token-mean", **options)
    x = logp.clone().requires_grad_(True)
    loss = cppo_code._reference_loss(x, old, token_adv, mask, cfg)
    loss.backward()
    assert_same(got, (loss.item(), x.grad))
    assert 0 < (~keep & mask).sum() < mask.sum()  # the mask drops some tokens, not all


def test_cppo_budget_masks_tokens_the_token_bound_alone_would_keep():
    """δ large, the budget's rate tiny: a drifted prefix spends the budget, and later tokens
    under δ are dropped (the authors' own case: D = 0.3, 0.3, 0.3, then 0.05)."""
    old = torch.log(torch.full((1, 4), 0.5, dtype=torch.float64))
    logp = torch.log(torch.tensor([[0.8, 0.8, 0.8, 0.55]], dtype=torch.float64))
    mask = torch.ones(1, 4, dtype=torch.bool)
    keep, _ = load_objective("cppo", delta=0.5, delta_b=0.001, delta_b_k=0.0, w_min=1.0).kept(
        ObjectiveInputs(logp, old, torch.ones(1, dtype=torch.float64), mask))
    assert keep.tolist() == [[True, False, False, False]]


@pytest.mark.parametrize("drift", [0.4, 3.0])
@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.5, 2.0)])
def test_topr_matches_roll(weights, agg, drift):
    """Rewards of both signs and zeros, two of them against their advantage's sign (the split is
    on the reward); ROLL divides seq-mean modes by B + 1e-8 and seq-mean-token-sum-norm by T alone."""
    logp, old, adv, mask = batch(seed=17, drift=drift)
    rewards = torch.tensor([1.0, 1.0, 0.0, -1.0, 0.0, 2.0], dtype=torch.float64)
    got = in_verl_terms(ours("topr", logp, old, adv, mask, rewards, positive_weight=weights[0],
                             negative_weight=weights[1], loss_agg=agg), agg, len(adv))  # fmt: skip
    y = logp.clone().requires_grad_(True)
    token_adv = adv[:, None].expand_as(logp) * mask  # ROLL's advantages are 0 past the response
    per_token = topr_code.topr_loss((y - old).exp(), y, token_adv, rewards, *weights)
    want_loss = topr_code.agg_loss(per_token, mask.double(), agg)
    want_loss.backward()
    assert_same(got, (want_loss.item(), y.grad), 1e-12 if agg in ("token-mean", "seq-mean-token-sum-norm") else 1e-7)
    assert got[1].abs().sum() > 0


def test_topr_without_rewards_says_what_it_needs():
    logp, old, adv, mask = batch(seed=17, drift=0.4)
    with pytest.raises(ValueError, match="topr needs each response's reward"):
        load_objective("topr")(ObjectiveInputs(logp, old, adv, mask))


def test_cppo_decides_its_mask_in_float32_under_bf16():
    """bf16 log-probs (autocast training): the quantile and prefix sums run in float32, so the
    mask is the one the same values give in float32 (torch's quantile takes no bf16)."""
    logp, old, adv, mask = batch(seed=13, drift=0.4)
    low = ObjectiveInputs(logp.bfloat16(), old.bfloat16(), adv.bfloat16(), mask)
    high = ObjectiveInputs(logp.bfloat16().float(), old.bfloat16().float(), adv.bfloat16().float(), mask)
    objective = load_objective("cppo")
    assert torch.equal(objective.kept(low)[0], objective.kept(high)[0])
    assert torch.isfinite(objective(low).loss)


@pytest.mark.parametrize("drift", [0.4, 3.0])
@pytest.mark.parametrize("taus", [(1.0, 1.05), (0.5, 2.0)])
def test_sapo_matches_verl(taus, drift):
    """verl aggregates SAPO by seq-mean-token-mean whatever its loss_agg_mode (the mode its
    authors use), adding 1e-8 to each row's count: hence the tolerance. minpro's other modes
    share the aggregation checked against verl's `agg_loss` above."""
    logp, old, adv, mask = batch(seed=19, drift=drift)
    got = ours("sapo", logp, old, adv, mask, tau_pos=taus[0], tau_neg=taus[1])
    want = theirs(verl_code.compute_policy_loss_sapo, logp, old, adv, mask,
                  config=verl_config(tau_pos=taus[0], tau_neg=taus[1]))  # fmt: skip
    assert_same(got, want, TOLERANCE["seq-mean-token-mean"])
    assert got[1].abs().sum() > 0
