"""SPO against hand computation, a per-token float64 loop of its paper's formula, and the minpro
conformance checks."""

from __future__ import annotations

import pytest
import torch
from minpro_examples.spo import SPO

from minpro_cli.conformance import check_plugin
from minpro_cli.objectives import ObjectiveInputs
from minpro_cli.registry import load_objective


@pytest.mark.parametrize("ratio,adv", [(1.0, 1.0), (1.5, 1.0), (0.4, -2.0), (3.0, -0.5), (1.1, 0.0)])
def test_single_token_loss_and_gradient_by_hand(ratio, adv):
    logp = torch.tensor([[-0.7]], dtype=torch.float64, requires_grad=True)
    old = logp.detach() - torch.log(torch.tensor(ratio, dtype=torch.float64))
    out = SPO()(ObjectiveInputs(logp, old, torch.tensor([adv], dtype=torch.float64), torch.tensor([[True]])))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(-(ratio * adv - abs(adv) / 0.4 * (ratio - 1) ** 2), rel=1e-12, abs=1e-15)
    # d/dlog π of −(ρA − |A|/(2ε)(ρ−1)²) = −ρ(A − |A|(ρ−1)/ε)
    assert logp.grad.item() == pytest.approx(-ratio * (adv - abs(adv) * (ratio - 1) / 0.2), rel=1e-9, abs=1e-15)


def spo_by_loop(logp, old, adv, mask, epsilon):
    """The paper's objective token by token, then seq-mean-token-mean."""
    rows = []
    for i in range(logp.shape[0]):
        terms = []
        for t in range(logp.shape[1]):
            if mask[i, t]:
                rho = torch.exp(logp[i, t] - old[i, t])
                terms.append(-(rho * adv[i] - abs(adv[i].item()) / (2 * epsilon) * (rho - 1) ** 2))
        rows.append(sum(terms) / len(terms))
    return sum(rows) / len(rows)


@pytest.mark.parametrize("epsilon", [0.2, 0.05])
def test_matches_a_loop_of_the_formula(epsilon):
    gen = torch.Generator().manual_seed(0)
    logp = -2 * torch.rand(4, 6, generator=gen, dtype=torch.float64)
    old = logp + 0.5 * torch.randn(4, 6, generator=gen, dtype=torch.float64)
    adv = torch.randn(4, generator=gen, dtype=torch.float64)
    mask = torch.arange(6)[None, :] < torch.tensor([6, 2, 4, 5])[:, None]
    x = logp.clone().requires_grad_(True)
    want = spo_by_loop(x, old, adv, mask, epsilon)
    want.backward()
    y = logp.clone().requires_grad_(True)
    ours = load_objective("spo", epsilon=epsilon)(ObjectiveInputs(y, old, adv, mask)).loss
    ours.backward()
    assert ours.item() == pytest.approx(want.item(), rel=1e-12)
    torch.testing.assert_close(y.grad, x.grad, rtol=1e-12, atol=1e-15)


def test_passes_minpro_conformance_checks():
    results = check_plugin("objectives", "spo", {}, policy=lambda: None)
    assert all(r.passed for r in results), [r for r in results if not r.passed]
