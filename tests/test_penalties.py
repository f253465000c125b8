"""KL penalty to a frozen reference and entropy bonus (`train.kl_coef`, `train.entropy_coef`):
estimators by hand, the entropy's gradient (its gradcheck through the chunked head is in
test_training_step), and the training step's gradient against an independent full-vocabulary
autograd computation."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from test_training_step import ragged_rows

from minpro_cli.config import load_recipe
from minpro_cli.logprobs import pack, response_logprobs
from minpro_cli.objectives import ObjectiveInputs
from minpro_cli.objectives.kl import kl_estimate
from minpro_cli.objectives.minpro import MinPRO
from minpro_cli.penalties import Penalties
from minpro_cli.step import RolloutBatch, Trainee, update_step
from minpro_cli.train import run_train

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


def test_kl_estimators_match_the_formulas_token_by_token():
    logp = torch.tensor([-0.5, -2.0, -1.0, -3.0, -30.0])
    ref = torch.tensor([-0.5, -1.0, -2.5, -0.1, -1.0])
    for t in range(5):
        log_r = max(-20.0, min(20.0, ref[t].item() - logp[t].item()))  # log π_ref/π_θ, clamped as ratios are
        assert kl_estimate(logp, ref, "k1")[t].item() == pytest.approx(-log_r, abs=1e-6)
        assert kl_estimate(logp, ref, "k2")[t].item() == pytest.approx(0.5 * log_r**2, abs=1e-5)
        k3 = min(math.exp(log_r) - 1 - log_r, 10.0)  # verl's cap: the last token's e^20 becomes 10
        assert kl_estimate(logp, ref, "k3")[t].item() == pytest.approx(k3, rel=1e-6)
    assert kl_estimate(logp, logp, "k3").abs().max() == 0 and kl_estimate(logp, logp, "k1").abs().max() == 0
    with pytest.raises(ValueError, match="k1, k2 or k3"):
        kl_estimate(logp, ref, "k4")  # type: ignore[arg-type]


def test_kl_gradient_flows_through_the_policy_only():
    logp = torch.tensor([-0.7, -1.3], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.0, -0.2], dtype=torch.float64, requires_grad=True)
    kl_estimate(logp, ref, "k3").sum().backward()
    # d/dlogp (e^{ref−logp} − 1 − (ref − logp)) = 1 − e^{ref−logp}
    torch.testing.assert_close(logp.grad, 1 - torch.exp(ref.detach() - logp.detach()))
    assert ref.grad is None


def by_hand(model: torch.nn.Module, batch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log-probs and entropy from the model's whole (B, R, V) logits, both differentiable."""
    width = batch.response_ids.shape[1]
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                   logits_to_keep=width + 1).logits[:, :-1]
    logp_all = torch.log_softmax(logits / temperature, -1)
    logprobs = logp_all.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
    return logprobs, -(logp_all.exp() * logp_all).sum(-1)


@pytest.mark.parametrize("chunked", [True, False])
def test_response_entropy_carries_its_gradient_only_when_asked(policy, chunked):
    model = copy.deepcopy(policy.model).double()
    if not chunked:  # a logit transform after the head takes the full-vocabulary path (Llama ignores it)
        model.config.logit_scale = 2.0
    batch = pack(*ragged_rows(policy), policy.pad_token_id)
    _, detached = response_logprobs(model, batch, 0.8, with_entropy=True)
    assert detached is not None and not detached.requires_grad
    _, entropy = response_logprobs(model, batch, 0.8, with_entropy=True, entropy_grad=True)
    (entropy * batch.response_mask).sum().backward()
    ours = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    (by_hand(model, batch, 0.8)[1] * batch.response_mask).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, atol=1e-10 * float(p.grad.abs().max()) + 1e-14, rtol=0)


def test_the_training_step_adds_kl_and_entropy_terms_to_the_objective(policy):
    """update_step with micro-batches of a few rows = autograd of
    objective + β·token-mean(k3) − γ·token-mean(H) over the whole minibatch."""
    model = copy.deepcopy(policy.model).double()
    reference = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.002 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    prompts, responses = ragged_rows(policy)
    temperature, kl_coef, entropy_coef = 0.8, 0.3, 0.05
    packed = pack(prompts, responses, policy.pad_token_id)
    mask = packed.response_mask
    with torch.no_grad():
        current = by_hand(model, packed, temperature)[0]
    old = current + 0.1 * torch.randn(current.shape, generator=gen, dtype=current.dtype)  # an older μ
    batch = RolloutBatch(prompts, responses, [row[: len(r)] for row, r in zip(old.tolist(), responses)],
                         torch.randn(4, generator=gen), temperature)
    objective = MinPRO()

    def step(penalties: Penalties) -> dict[str, torch.Tensor]:
        trainee = Trainee(model, policy.pad_token_id, micro_batch_tokens=24)  # 3 micro-batches
        metrics = update_step(trainee, torch.optim.SGD(model.parameters(), lr=0.0), objective, batch, 1e9,
                              penalties=penalties)
        step.metrics = metrics
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    def reference_logprobs(b, t):
        return response_logprobs(reference, b, t)[0]

    ours = step(Penalties(kl_coef, "k3", entropy_coef, reference_logprobs))
    kl_mean = step.metrics["kl_ref"]
    plain = step(Penalties())
    assert "kl_ref" not in step.metrics

    model.zero_grad()
    logprobs, entropy = by_hand(model, packed, temperature)
    with torch.no_grad():
        ref = by_hand(reference, packed, temperature)[0]
    log_r = torch.where(mask, ref - logprobs, 0.0)
    k3 = torch.exp(log_r) - log_r - 1
    assert float(k3.detach().max()) < 10  # below verl's cap: the formula holds unclamped
    n = mask.sum()
    loss = (objective(ObjectiveInputs(logprobs, old * mask, batch.advantages.double(), mask)).loss
            + kl_coef * (k3 * mask).sum() / n - entropy_coef * (entropy * mask).sum() / n)
    loss.backward()
    assert kl_mean == pytest.approx(float((k3 * mask).sum().detach() / n), rel=1e-9)
    for name, p in model.named_parameters():
        scale = float(p.grad.abs().max())
        torch.testing.assert_close(ours[name], p.grad, atol=1e-9 * scale + 1e-14, rtol=0)
    change = sum(float((ours[k] - plain[k]).norm()) for k in ours)
    assert change > 1e-3 * sum(float(g.norm()) for g in plain.values())  # the terms are not negligible


def test_kl_to_the_starting_model_is_zero_at_the_first_step_then_grows(tmp_path):
    recipe = load_recipe(QUICKSTART, [
        f"run_dir={tmp_path}", "train.iterations=3", "train.prompts_per_iteration=4", "train.group_size=4",
        "sampler.options.max_new_tokens=24", "optim.warmup_steps=0", "optim.lr=3e-3", "train.kl_coef=0.05",
        "train.entropy_coef=0.01",
    ])  # fmt: skip
    run_train(recipe)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 1 and records[0]["kl_ref"] == 0.0  # π_θ = π_ref exactly before any update
    assert all(r["kl_ref"] > 0 for r in records[1:])  # k3 ≥ 0, and the policy has moved
