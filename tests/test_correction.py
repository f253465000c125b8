"""The correction layer against a loop-based float64 reference, the gradient it scales, the
log-linear anchor against AReaL's formula, and the explicit minibatch counts."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from invariance_cases import CORRECTIONS, synthetic_minibatch

from minpro_cli.anchors import loglinear_anchor
from minpro_cli.config import Recipe
from minpro_cli.correction import CorrectionConfig, Rejection, correct, scale_gradient
from minpro_cli.logprobs import pack, pad_rows
from minpro_cli.modeling import load_policy
from minpro_cli.objectives import MinibatchCounts, ObjectiveInputs, aggregate_loss, minibatch_counts
from minpro_cli.objectives.cispo import CISPO

# ---- reference: plain Python over rows and tokens, math in float64 --------------------------


def ref_weights(cfg: CorrectionConfig, anchor, behavior, current, advantages, lengths) -> list[list[float]]:
    out = []
    for i, n in enumerate(lengths):
        log_c = [max(-20.0, min(20.0, anchor[i][t] - behavior[i][t])) for t in range(n)]
        out.append([ref_level(cfg, log_c, t) * ref_keep(cfg, log_c, behavior[i], current[i], advantages[i], t)
                    for t in range(n)])  # fmt: skip
    return out


def ref_level(cfg: CorrectionConfig, log_c: list[float], t: int) -> float:
    if cfg.level is None:
        return 1.0
    n = len(log_c)
    if cfg.level == "token":
        log_w = log_c[t]
    elif cfg.level == "sequence":
        log_w = sum(log_c)
    elif cfg.level == "geometric":
        log_w = sum(log_c) / n
    elif cfg.level == "prefix_min":
        log_w = (min(log_c[:t]) if t else 0.0) + log_c[t]
    else:
        log_w = sum(log_c[: t + 1])
    w = math.exp(max(-20.0, min(20.0, log_w)))
    low = cfg.low if cfg.low is not None else -math.inf
    high = cfg.high if cfg.high is not None else math.inf
    if cfg.action == "truncate":
        return min(max(w, low), high)
    return w if low <= w <= high else 0.0


def ref_kl(log_c: float, kind: str) -> float:
    return {"k1": -log_c, "k2": 0.5 * log_c * log_c, "k3": math.exp(log_c) - 1 - log_c}[kind]


def ref_keep(cfg: CorrectionConfig, log_c, behavior, current, advantage, t) -> float:
    n = len(log_c)
    for rule in cfg.reject:
        values = [ref_kl(v, rule.kl) for v in log_c]
        stat = {"token": values[t], "mean": sum(values) / n, "sum": sum(values), "max": max(values)}[rule.agg]
        if stat > rule.high or (rule.low is not None and stat < rule.low):
            return 0.0
    for v in log_c:
        c = math.exp(v)
        if (cfg.veto_low is not None and c < cfg.veto_low) or (cfg.veto_high is not None and c > cfg.veto_high):
            return 0.0
    if cfg.opsm_delta is not None:
        gap = sum(behavior[s] - current[s] for s in range(n)) / n
        if advantage < 0 and gap > cfg.opsm_delta:
            return 0.0
    return 1.0


MODES = {
    **{f"{level}/truncate": CorrectionConfig(level=level, low=0.5, high=1.3)
       for level in ("token", "sequence", "geometric", "prefix_min", "prefix")},
    **{f"{level}/mask": CorrectionConfig(level=level, action="mask", low=0.6, high=1.6)
       for level in ("token", "sequence", "geometric", "prefix_min", "prefix")},
    "token/tis-upper-only": CorrectionConfig(level="token", high=1.1),
    **{f"reject/{kl}/{agg}": CorrectionConfig(reject=[Rejection(kl=kl, agg=agg, low=-0.05 if kl == "k1" else None,
                                                                high={"token": 0.05, "mean": 0.025, "sum": 0.3,
                                                                      "max": 0.08}[agg])])
       for kl in ("k1", "k2", "k3") for agg in ("token", "mean", "sum", "max")},
    "veto": CorrectionConfig(veto_low=0.7, veto_high=1.5),
    "opsm": CorrectionConfig(opsm_delta=0.01),
    "all": CorrectionConfig(level="prefix_min", high=1.4, reject=[Rejection(kl="k3", agg="mean", high=0.05)],
                            veto_low=0.3, opsm_delta=0.05),
}  # fmt: skip


def batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    lengths = [7, 1, 12, 4, 9, 3]
    width = max(lengths) + 2
    behavior = -3 * torch.rand(len(lengths), width, generator=gen, dtype=torch.float64)
    anchor = behavior + 0.25 * torch.randn(behavior.shape, generator=gen, dtype=torch.float64)
    current = anchor + 0.1 * torch.randn(behavior.shape, generator=gen, dtype=torch.float64)
    mask = torch.arange(width)[None] < torch.tensor(lengths)[:, None]
    advantages = torch.tensor([1.0, -0.5, -1.2, 0.7, -0.3, 0.0], dtype=torch.float64)
    return anchor, behavior, current, advantages, mask, lengths


@pytest.mark.parametrize("mode", list(MODES))
def test_every_correction_mode_equals_the_loop_reference(mode):
    cfg = MODES[mode]
    anchor, behavior, current, advantages, mask, lengths = batch()
    got = correct(cfg, anchor, behavior, current, advantages, mask)
    expected = ref_weights(cfg, anchor.tolist(), behavior.tolist(), current.tolist(), advantages.tolist(), lengths)
    for i, n in enumerate(lengths):
        assert got.weights[i, :n].tolist() == pytest.approx(expected[i], rel=1e-12, abs=1e-15), (mode, i)
        assert (got.weights[i, n:] == 1).all()  # padding: untouched (its gradient is 0 anyway)
    flat = [w for row in expected for w in row]
    assert any(w != 1.0 for w in flat), f"{mode}: the mode changed no weight: the case tests nothing"


def test_metrics_only_weights_nothing_but_counts_what_it_would_reject():
    anchor, behavior, current, advantages, mask, _ = batch()
    cfg = CorrectionConfig(level="token", action="mask", low=0.9, high=1.1, metrics_only=True)
    got = correct(cfg, anchor, behavior, current, advantages, mask)
    assert (got.weights == 1).all() and got.masked.any()


def test_scaled_gradient_is_the_gradient_of_the_weighted_per_token_loss():
    """CISPO through `scale_gradient` = autograd of Σ W_t ℓ_t / N with ℓ_t CISPO's own term."""
    anchor, behavior, current, advantages, mask, _ = batch(1)
    cfg = MODES["all"]
    weights = correct(cfg, anchor, behavior, current, advantages, mask).weights
    objective = CISPO(eps_low=0.2, eps_high=0.2)
    logprobs = current.clone().requires_grad_(True)
    loss = objective(ObjectiveInputs(scale_gradient(logprobs, weights), anchor, advantages, mask)).loss
    loss.backward()
    reference = current.clone().requires_grad_(True)
    ratio = (reference - anchor).exp().detach().clamp(0.8, 1.2)
    per_token = -ratio * advantages[:, None] * reference * weights
    aggregate_loss(per_token, mask, "token-mean").backward()
    assert torch.allclose(logprobs.grad, reference.grad, rtol=1e-12, atol=1e-15)
    plain = CISPO(eps_low=0.2, eps_high=0.2)(ObjectiveInputs(current, anchor, advantages, mask)).loss
    assert loss.item() == plain.item()  # the value is the objective's, untouched


def test_loglinear_anchor_is_areals_interpolation():
    """α = clamp((v_prox − v_μ)/(v_θ − v_μ), 0, 1), 0 where v_θ ≤ v_μ (AReaL
    `compute_prox_logp_approximations`, v_prox = v_θ − 1 at the round's first step)."""
    behavior = torch.tensor([[-1.0, -2.0], [-0.5, -0.7], [-3.0, -1.0]], dtype=torch.float64)
    current = torch.tensor([[-1.5, -1.0], [-0.1, -0.9], [-2.0, -2.0]], dtype=torch.float64)
    versions = torch.tensor([[4, 4], [2, 2], [5, 5]])
    got = loglinear_anchor(current, behavior, versions, proximal=4, version=5)
    for i in range(3):
        v = versions[i, 0].item()
        alpha = 0.0 if 5 <= v else min(max((4 - v) / (5 - v), 0.0), 1.0)
        for t in range(2):
            expected = behavior[i, t].item() + alpha * (current[i, t].item() - behavior[i, t].item())
            assert got[i, t].item() == pytest.approx(expected, rel=1e-15)
    assert got[0].tolist() == behavior[0].tolist()  # on-policy (v_μ = v_prox): α = 0, π_prox = μ
    assert got[1].tolist() == pytest.approx((behavior[1] + 2 / 3 * (current[1] - behavior[1])).tolist())


def test_correction_with_the_behaviour_anchor_is_an_error_naming_the_anchor():
    with pytest.raises(ValueError, match="train.anchor=sampling_weights"):
        Recipe.model_validate({"correction": {"level": "token"}})
    Recipe.model_validate({"correction": {"level": "token"}, "train": {"anchor": "round_start"}})


@pytest.mark.parametrize("cfg", [{"reject": [{"kl": "k3", "low": 0.1, "high": 1}]}, {"low": 2, "high": 1}])
def test_bad_correction_bounds_are_refused(cfg):
    with pytest.raises(ValueError):
        CorrectionConfig.model_validate(cfg)


def test_every_invariance_case_correction_bites_on_its_batch():
    policy = load_policy("embedded")
    policy.model.double()
    part = synthetic_minibatch(policy, torch.float64)
    mask = pack(part.prompts, part.responses, 0).response_mask
    like = torch.zeros(mask.shape, dtype=torch.float64)
    behavior = pad_rows(part.behavior_logprobs, like)
    for name, off in CORRECTIONS.items():
        anchor = pad_rows(part.scores.get(off.anchor, part.scores["sampling_weights"]), like)
        got = correct(off.correction, anchor, behavior, anchor + 0.05, part.advantages, mask)
        assert (got.weights[mask] != 1).any(), name


def test_counts_are_an_explicit_input_and_the_hidden_ones_warn():
    per_token = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    whole = MinibatchCounts(tokens=10, sequences=4, rows=5, length=6)
    assert aggregate_loss(per_token, mask, "token-mean", counts=whole).item() == pytest.approx(0.6)
    assert aggregate_loss(per_token, mask, "token-mean").item() == pytest.approx(2.0)  # this batch's own
    with minibatch_counts(whole), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert aggregate_loss(per_token, mask, "token-mean").item() == pytest.approx(0.6)
    assert any(issubclass(w.category, DeprecationWarning) and "inputs.counts" in str(w.message) for w in caught)
    inputs = ObjectiveInputs(per_token, old_logprobs=per_token * 0, advantages=torch.ones(2), response_mask=mask)
    assert inputs.old_logprobs is inputs.anchor_logprobs is inputs.behavior_logprobs
