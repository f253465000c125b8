"""MinPRO against hand-worked examples, a brute-force reference and autograd."""

from __future__ import annotations

import math

import pytest
import torch

from minpro_cli.errors import PluginError
from minpro_cli.objectives import ObjectiveInputs, aggregate_loss
from minpro_cli.objectives.logratios import log_min_prefix_ratio, log_prefix_ratio
from minpro_cli.objectives.minpro import MinPRO
from minpro_cli.registry import load_objective


def inputs_from_ratios(ratios, mask, adv=1.0, logp=None):
    """Build inputs whose token ratios are exactly `ratios` (old = logp − log ratio)."""
    ratios = torch.tensor([ratios], dtype=torch.float64)
    logp = torch.full_like(ratios, -1.0) if logp is None else torch.tensor([logp], dtype=torch.float64)
    logp.requires_grad_(True)
    return ObjectiveInputs(
        logprobs=logp,
        old_logprobs=(logp.detach() - ratios.log()),
        advantages=torch.tensor([adv], dtype=torch.float64),
        response_mask=torch.tensor([mask]),
    )


def test_hand_worked_weights_and_loss():
    # ρ = [2, 0.5, 1.5, 1]: ρ̲ = [1, 2, 0.5, 0.5], ρ̲ρ = [2, 1, 0.75, 0.5], clipped at 1.2 above
    inp = inputs_from_ratios([2.0, 0.5, 1.5, 1.0], [True] * 4, adv=2.0, logp=[-1.0, -2.0, -0.5, -3.0])
    out = MinPRO(eps_low=1.0, eps_high=0.2)(inp)
    weights = [1.2, 1.0, 0.75, 0.5]
    expected = -sum(w * 2.0 * lp for w, lp in zip(weights, [-1.0, -2.0, -0.5, -3.0])) / 4
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    assert out.metrics["clip_frac_high"] == pytest.approx(0.25)
    assert out.metrics["min_prefix_ratio_min"] == pytest.approx(0.5)


def test_first_token_has_empty_prefix():
    out = log_min_prefix_ratio(torch.tensor([[math.log(0.1), 0.0]]), torch.tensor([[True, True]]))
    assert out[0, 0].item() == 0.0  # ρ̲_1 = 1 whatever ρ_1 is
    assert out[0, 1].item() == pytest.approx(math.log(0.1))


def test_early_tiny_ratio_damps_every_later_token():
    ratios = [1.0, 1e-3, 1.0, 1.1, 0.9]
    inp = inputs_from_ratios(ratios, [True] * 5)
    min_prefix = log_min_prefix_ratio((inp.logprobs - inp.old_logprobs).detach(), inp.response_mask).exp()[0]
    assert min_prefix.tolist() == pytest.approx([1.0, 1.0, 1e-3, 1e-3, 1e-3])


def test_padding_in_the_middle_and_end_never_enters_the_minimum():
    # positions 1 and 4 are masked (padding / non-policy tokens) with tiny ratios
    ratios = [0.8, 1e-6, 1.1, 0.9, 1e-6]
    mask = [True, False, True, True, False]
    log_min = log_min_prefix_ratio(torch.tensor([ratios]).log(), torch.tensor([mask])).exp()[0]
    assert log_min[[0, 2, 3]].tolist() == pytest.approx([1.0, 0.8, 0.8])


def test_leading_masked_tokens_leave_the_prefix_empty():
    log_min = log_min_prefix_ratio(torch.tensor([[math.log(0.01), math.log(0.5)]]), torch.tensor([[False, True]]))
    assert log_min[0, 1].item() == 0.0


def test_loss_is_invariant_to_trailing_padding():
    short = inputs_from_ratios([0.7, 1.3, 0.9], [True] * 3, adv=-1.0, logp=[-1.0, -2.0, -0.3])
    padded = inputs_from_ratios([0.7, 1.3, 0.9, 5.0, 5.0], [True, True, True, False, False], adv=-1.0,
                                logp=[-1.0, -2.0, -0.3, -9.0, -9.0])
    assert MinPRO()(short).loss.item() == pytest.approx(MinPRO()(padded).loss.item(), rel=1e-12)


def brute_force_min_prefix(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(log_ratio)
    for b in range(log_ratio.shape[0]):
        for t in range(log_ratio.shape[1]):
            prev = [log_ratio[b, i].item() for i in range(t) if mask[b, i]]
            out[b, t] = min(prev) if prev else 0.0
    return out


def test_cummin_matches_brute_force_on_random_batches():
    gen = torch.Generator().manual_seed(0)
    log_ratio = torch.randn(6, 17, generator=gen, dtype=torch.float64)
    mask = torch.rand(6, 17, generator=gen) > 0.3
    assert torch.equal(log_min_prefix_ratio(log_ratio, mask), brute_force_min_prefix(log_ratio, mask))


def test_prefix_ratio_is_cumulative_product_over_response_tokens():
    log_ratio = torch.tensor([[math.log(2.0), math.log(3.0), math.log(0.5)]])
    out = log_prefix_ratio(log_ratio, torch.tensor([[True, False, True]])).exp()[0]
    assert out.tolist() == pytest.approx([2.0, 2.0, 1.0])


def test_gradient_equals_analytic_detached_weight():
    gen = torch.Generator().manual_seed(1)
    logp = (-torch.rand(3, 6, generator=gen, dtype=torch.float64) * 3).requires_grad_(True)
    old = logp.detach() + 0.3 * torch.randn(3, 6, generator=gen, dtype=torch.float64)
    adv = torch.tensor([1.5, -0.7, 0.2], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 1, 0]], dtype=torch.bool)
    opts = MinPRO(eps_low=1.0, eps_high=0.2)
    opts(ObjectiveInputs(logp, old, adv, mask)).loss.backward()
    # analytic: ∂L/∂logπ_t = −w_t·A / N on response tokens (w detached), 0 elsewhere
    log_rho = (logp.detach() - old).clamp(-20, 20)
    w = (brute_force_min_prefix(log_rho, mask) + log_rho).exp().clamp(0.0, 1.2)
    expected = torch.where(mask, -w * adv[:, None] / mask.sum(), torch.zeros_like(w))
    torch.testing.assert_close(logp.grad, expected, rtol=1e-12, atol=1e-12)


def test_central_differences_see_only_the_log_pi_term():
    """Finite differences with ρ held fixed (old shifted with logp, as sg[] does) match autograd."""
    gen = torch.Generator().manual_seed(2)
    logp = (-torch.rand(2, 5, generator=gen, dtype=torch.float64)).requires_grad_(True)
    old = logp.detach() + 0.05 * torch.randn(2, 5, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    MinPRO()(ObjectiveInputs(logp, old, adv, mask)).loss.backward()
    eps = 1e-6
    for idx in [(0, 1), (1, 4), (0, 4)]:
        shift = torch.zeros_like(old)
        shift[idx] = eps
        base = logp.detach()
        f_plus = MinPRO()(ObjectiveInputs(base + shift, old + shift, adv, mask)).loss
        f_minus = MinPRO()(ObjectiveInputs(base - shift, old - shift, adv, mask)).loss
        assert logp.grad[idx].item() == pytest.approx(((f_plus - f_minus) / (2 * eps)).item(), abs=1e-8)
    assert logp.grad[0, 4].item() == 0.0  # masked position gets no gradient


def test_prefix_cap_at_one_never_upweights():
    inp = inputs_from_ratios([1.5, 1.1, 1.0], [True] * 3, logp=[-1.0, -1.0, -1.0])
    capped = MinPRO(prefix_cap_at_one=True, eps_high=10.0)(inp)
    free = MinPRO(prefix_cap_at_one=False, eps_high=10.0)(inp)
    # free weights [1.5, 1.65, 1.1]; capped ρ̲ = min(1, ρ̲) gives [1.5, 1.1, 1.0]
    assert free.loss.item() == pytest.approx((1.5 + 1.65 + 1.1) / 3, rel=1e-9)
    assert capped.loss.item() == pytest.approx((1.5 + 1.1 + 1.0) / 3, rel=1e-9)


def test_lower_clip_applies_when_eps_low_below_one():
    inp = inputs_from_ratios([0.1, 1.0], [True, True], logp=[-1.0, -1.0])
    out = MinPRO(eps_low=0.2, eps_high=0.2)(inp)
    # weights: max(0.1, 0.8) = 0.8 and ρ̲ρ = 0.1·1.0 → 0.8
    assert out.loss.item() == pytest.approx((0.8 + 0.8) / 2, rel=1e-9)
    assert out.metrics["clip_frac_low"] == 1.0


def test_log_ratio_is_clamped_before_exp():
    inp = inputs_from_ratios([1.0, 1.0], [True, True], logp=[-1.0, -1.0])
    inp.old_logprobs = torch.tensor([[-1000.0, -1.0]], dtype=torch.float64)  # log ρ_1 = 999
    out = MinPRO(eps_high=1e30)(inp)
    assert out.loss.item() == pytest.approx((math.exp(20.0) + math.exp(20.0)) / 2, rel=1e-9)


@pytest.mark.parametrize(
    "mode,expected",
    [
        ("token-mean", (1 + 2 + 3 + 4 + 5) / 5),
        ("seq-mean-token-mean", ((1 + 2) / 2 + (3 + 4 + 5) / 3) / 2),
        ("seq-mean-token-sum", ((1 + 2) + (3 + 4 + 5)) / 2),
    ],
)
def test_loss_aggregation_modes(mode, expected):
    per_token = torch.tensor([[1.0, 2.0, 99.0], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert aggregate_loss(per_token, mask, mode).item() == pytest.approx(expected)


def test_load_objective_validates_options_by_name():
    objective = load_objective("minpro", eps_low=1.0, eps_high=0.3, loss_agg="token-mean")
    assert objective.eps_high == 0.3
    with pytest.raises(PluginError, match="eps_hi"):
        load_objective("minpro", eps_hi=0.3)
    with pytest.raises(PluginError, match="eps_high"):
        load_objective("minpro", eps_high="lots")
    with pytest.raises(PluginError, match="unknown objective 'nope'"):
        load_objective("nope")
