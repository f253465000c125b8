"""SAPO against hand computation, TRL's formula and the minpro conformance checks."""

from __future__ import annotations

import math

import pytest
import torch
from minpro_examples.sapo import SAPO

from minpro_cli.conformance import check_plugin
from minpro_cli.objectives import ObjectiveInputs
from minpro_cli.registry import load_objective


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@pytest.mark.parametrize("ratio,adv", [(1.0, 1.0), (1.5, 1.0), (0.4, -2.0), (3.0, -0.5)])
def test_single_token_loss_and_gradient_by_hand(ratio, adv):
    logp = torch.tensor([[-0.7]], dtype=torch.float64, requires_grad=True)
    old = logp.detach() - math.log(ratio)
    out = SAPO()(ObjectiveInputs(logp, old, torch.tensor([adv], dtype=torch.float64), torch.tensor([[True]])))
    out.loss.backward()
    tau = 1.0 if adv > 0 else 1.05
    s = sigmoid(tau * (ratio - 1.0))
    assert out.loss.item() == pytest.approx(-(4 / tau) * s * adv, rel=1e-12)
    assert logp.grad.item() == pytest.approx(-adv * 4 * s * (1 - s) * ratio, rel=1e-9)


def test_matches_trl_sapo():
    """TRL: soft = σ(τ(r−1))·4/τ with τ = pos if A > 0 else neg; ℓ = −soft·A; mean_i(Σ_t ℓm / Σ_t m)."""
    gen = torch.Generator().manual_seed(0)
    logp = -2 * torch.rand(4, 6, generator=gen, dtype=torch.float64)
    old = logp + 0.5 * torch.randn(4, 6, generator=gen, dtype=torch.float64)
    adv = torch.randn(4, generator=gen, dtype=torch.float64)
    mask = torch.arange(6)[None, :] < torch.tensor([6, 2, 4, 5])[:, None]

    x = logp.clone().requires_grad_(True)
    coef = torch.exp(x - old)
    temps = torch.where(adv[:, None] > 0, torch.tensor(1.0, dtype=torch.float64), torch.tensor(1.05, dtype=torch.float64))
    ptl = -(torch.sigmoid(temps * (coef - 1)) * 4 / temps) * adv[:, None]
    trl = ((ptl * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    trl.backward()

    y = logp.clone().requires_grad_(True)
    ours = load_objective("sapo")(ObjectiveInputs(y, old, adv, mask)).loss
    ours.backward()
    assert ours.item() == pytest.approx(trl.item(), rel=1e-12)
    torch.testing.assert_close(y.grad, x.grad)


def test_passes_minpro_conformance_checks():
    results = check_plugin("objectives", "sapo", {}, policy=lambda: None)
    assert all(r.passed for r in results), [r for r in results if not r.passed]
