"""`minpro plugins check`: the contract every plugin must meet, checked on the installed plugin.

The same checks run on every built-in in the project's own tests. Each check returns a
`CheckResult`; a check that raises fails with the exception as its detail.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from pydantic import BaseModel, ValidationError

from minpro_cli.modeling import Policy
from minpro_cli.objectives import MinibatchCounts, Objective, ObjectiveInputs, is_scalar_metric, minibatch_counts
from minpro_cli.registry import REQUIRED_BASE, Kind, discover
from minpro_cli.samplers import Generation
from minpro_cli.verifiers import VerifyResult

UNKNOWN_OPTION = "__not_an_option__"
VERIFIER_BOUND_S = 10.0  # a verifier without a timeout option must still answer within this


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    detail: str = ""


def run_check(name: str, check: Callable[[], str | None]) -> CheckResult:
    """A check returns None (or a note) when it holds and raises AssertionError when not."""
    try:
        return CheckResult(name, True, check() or "")
    except AssertionError as exc:
        return CheckResult(name, False, str(exc) or "assertion failed")
    except Exception as exc:  # noqa: BLE001 — a plugin bug is a failed check, not a crash of the checker
        return CheckResult(name, False, f"{type(exc).__name__}: {exc}")


def options_checks(cls: type[BaseModel], options: dict[str, Any], base: type[BaseModel] = BaseModel) -> list[CheckResult]:
    def is_model() -> str:
        assert issubclass(cls, base), f"{cls.__name__} must subclass {base.__module__}.{base.__name__}"
        return f"{len(cls.model_fields)} option(s): {', '.join(cls.model_fields) or 'none'}"

    def rejects_unknown() -> None:
        try:
            cls(**options, **{UNKNOWN_OPTION: 1})
        except ValidationError:
            return
        raise AssertionError("an unknown option was accepted: set model_config = ConfigDict(extra='forbid')")

    def validates() -> None:
        cls(**options)

    return [run_check("options are a Pydantic model", is_model),
            run_check("options validate with the given values", validates),
            run_check("unknown options are rejected", rejects_unknown)]


# --- objectives ---------------------------------------------------------------------------


def objective_batch(seed: int, pad: int = 0, on_policy: bool = False) -> ObjectiveInputs:
    """Right-padded rows (one fully masked), mixed-sign per-sequence advantages, `pad` extra
    masked columns holding garbage."""
    gen = torch.Generator().manual_seed(seed)
    rows, width = 5, 9
    logp = -2 * torch.rand(rows, width, generator=gen)
    old = logp if on_policy else logp + 0.3 * torch.randn(rows, width, generator=gen)
    garbage = torch.full((rows, pad), -50.0)  # what a padded position may hold: anything
    logp, old = torch.cat([logp, garbage], dim=1), torch.cat([old, garbage + 7.0], dim=1)
    lengths = torch.tensor([9, 4, 1, 6, 0])
    mask = torch.arange(width + pad)[None, :] < lengths[:, None]
    advantages = torch.tensor([1.5, -0.8, 0.6, -1.2, 2.0])
    rewards = (advantages > 0).float()
    return ObjectiveInputs(logp.clone().requires_grad_(True), old.detach().clone(), advantages, mask, rewards=rewards)


def _call(objective: Objective, inputs: ObjectiveInputs) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor]:
    out = objective(inputs)
    out.loss.backward()
    assert inputs.logprobs.grad is not None, "the loss does not depend on logprobs"
    return out.loss, out.metrics, inputs.logprobs.grad


def scalar_finite(objective: Objective) -> str:
    loss, _, _ = _call(objective, objective_batch(0))
    assert loss.dim() == 0, f"loss has shape {tuple(loss.shape)}, expected a scalar"
    assert torch.isfinite(loss), f"loss is {loss.item()}"
    return f"loss {loss.item():+.4g}"


def gradient_on_response_only(objective: Objective) -> None:
    inputs = objective_batch(1)
    _, _, grad = _call(objective, inputs)
    assert torch.isfinite(grad).all(), "non-finite gradient"
    outside = grad[~inputs.response_mask].abs().max().item()
    assert outside == 0.0, f"gradient {outside:.3g} on a masked position (padding or a fully masked row)"
    assert grad[inputs.response_mask].abs().max().item() > 0, "no gradient on any response token"


def metrics_are_scalars(objective: Objective) -> str:
    _, metrics, _ = _call(objective, objective_batch(2))
    bad = {k: type(v).__name__ for k, v in metrics.items() if not isinstance(k, str) or not is_scalar_metric(v)}
    assert not bad, f"metrics must be floats or detached 0-d tensors: {bad}"
    return f"{len(metrics)} metric(s)"


def padding_invariance(objective: Objective) -> None:
    short, padded = objective_batch(3), objective_batch(3, pad=6)
    loss_s, _, grad_s = _call(objective, short)
    loss_p, _, grad_p = _call(objective, padded)
    assert math.isclose(loss_s.item(), loss_p.item(), rel_tol=1e-5, abs_tol=1e-7), (
        f"loss changes with padding: {loss_s.item()} vs {loss_p.item()} (normalise by the mask, not the width)"
    )
    assert torch.allclose(grad_s, grad_p[:, : grad_s.shape[1]], rtol=1e-5, atol=1e-7), "gradient changes with padding"


def on_policy_direction(objective: Objective) -> None:
    inputs = objective_batch(4, on_policy=True)
    _, _, grad = _call(objective, inputs)
    adv = inputs.token_advantages()
    trained = inputs.response_mask & (adv != 0)
    wrong = (torch.sign(grad[trained]) != -torch.sign(adv[trained])).sum().item()
    assert wrong == 0, (
        f"at ratio 1, {wrong} token(s) move against the policy gradient (∂L/∂log π must have the sign of −A)"
    )


def per_token_advantages(objective: Objective) -> None:
    inputs = objective_batch(5)
    inputs.advantages = inputs.advantages[:, None] * torch.linspace(0.5, 1.5, inputs.logprobs.shape[1])
    loss, _, _ = _call(objective, inputs)
    assert torch.isfinite(loss), "non-finite loss with (B, T) advantages"


def _rows(inputs: ObjectiveInputs, rows: slice, counts: MinibatchCounts) -> ObjectiveInputs:
    rewards = inputs.rewards[rows] if inputs.rewards is not None else None
    return ObjectiveInputs(inputs.logprobs.detach()[rows].clone().requires_grad_(True), inputs.anchor_logprobs[rows],
                           inputs.advantages[rows], inputs.response_mask[rows], counts=counts, rewards=rewards)  # fmt: skip


def split_invariance(objective: Objective) -> str | None:
    """Cut into two micro-batches, each normalised by the whole minibatch's `counts`, the losses
    add up to the whole one and so do the gradients: what `minpro train` relies on to cut a
    minibatch into micro-batches and ranks. An objective that divides by its own batch's count
    (a mean of its own) fails."""
    if objective.couples_rows:
        return "waived: couples_rows (its loss depends on the rows it is given; train with micro_batch_tokens: null)"
    whole = objective_batch(6)
    counts = MinibatchCounts.of_mask(whole.response_mask)
    with warnings.catch_warnings(record=True) as caught, minibatch_counts(counts):  # the deprecated implicit path too
        warnings.simplefilter("always", DeprecationWarning)
        loss, _, grad = _call(objective, _rows(whole, slice(None), counts))
        parts = [_rows(whole, rows, counts) for rows in (slice(0, 2), slice(2, None))]
        results = [_call(objective, part) for part in parts]
    summed = sum(r[0].item() for r in results)
    assert math.isclose(loss.item(), summed, rel_tol=1e-5, abs_tol=1e-7), (
        f"the loss of the whole minibatch is {loss.item():.6g}, its two halves' add up to {summed:.6g}: normalise "
        "with self.aggregate(per_token, mask, inputs.counts), not by the batch's own count"
    )
    assert torch.allclose(torch.cat([r[2] for r in results]), grad, rtol=1e-5, atol=1e-7), "gradients differ when split"
    if any(issubclass(w.category, DeprecationWarning) for w in caught):
        return "through the deprecated implicit counts: pass inputs.counts to aggregate"
    return None


OBJECTIVE_CHECKS: list[tuple[str, Callable[[Objective], str | None]]] = [
    ("loss is a finite scalar", scalar_finite),
    ("gradient only on response tokens", gradient_on_response_only),
    ("metrics are scalars", metrics_are_scalars),
    ("invariant to padding length", padding_invariance),
    ("on-policy gradient follows −A", on_policy_direction),
    ("accepts per-token advantages", per_token_advantages),
    ("invariant to splitting the minibatch", split_invariance),
]


def objective_checks(objective: Objective) -> list[CheckResult]:
    return [run_check(name, partial(check, objective)) for name, check in OBJECTIVE_CHECKS]


# --- verifiers ----------------------------------------------------------------------------

VERIFIER_CASES = [
    ("The answer is \\boxed{42}.", "42"),
    ("I think it is 41.", "42"),
    ("", "42"),
    ("\\boxed{}", "42"),
    ("ünïcödé ✓ \x00 \\boxed{\\frac{1}{2}}", "0.5"),
    ("42 " * 5000, "42"),
]
HOSTILE = "\\boxed{" + "(" * 20_000 + "x" * 100_000 + "}" + " 9^9^9^9^9^9^9" * 200


def verifier_checks(verifier: Any) -> list[CheckResult]:
    def rewards_in_range() -> str:
        rewards = []
        for response, reference in VERIFIER_CASES:
            result = verifier(response, reference)
            assert isinstance(result, VerifyResult), f"returned {type(result).__name__}, expected VerifyResult"
            assert isinstance(result.details, dict), "details must be a dict"
            assert 0.0 <= float(result.reward) <= 1.0, f"reward {result.reward} outside [0, 1] for {response[:30]!r}"
            rewards.append(float(result.reward))
        return "rewards " + " ".join(f"{r:g}" for r in rewards)

    def bounded_time() -> str:
        bound = 2 * float(getattr(verifier, "timeout_s", VERIFIER_BOUND_S / 2)) + 2.0
        started = time.perf_counter()
        result = verifier(HOSTILE, "42")
        took = time.perf_counter() - started
        assert took <= bound, f"a hostile input took {took:.1f} s (bound {bound:.0f} s from timeout_s)"
        assert 0.0 <= float(result.reward) <= 1.0, "hostile input got a reward outside [0, 1]"
        return f"hostile input answered in {took:.2f} s (bound {bound:.0f} s)"

    return [run_check("rewards in [0, 1] with details, never raises", rewards_in_range),
            run_check("timeout respected on a hostile input", bounded_time)]


# --- samplers -----------------------------------------------------------------------------


def sampler_checks(sampler: Any, policy: Policy) -> list[CheckResult]:
    prompts = [policy.tokenizer.encode(text, add_special_tokens=False) for text in ("Compute 2+3.\n", "Compute 7-4.\n")]

    def sampling_parameters() -> None:
        missing = [a for a in ("temperature", "top_p", "top_k") if not hasattr(sampler, a)]
        assert not missing, f"rollout rows record {missing}: expose them as options"

    def logprob_lengths() -> str:
        generations = sampler.generate(policy, prompts, 0)
        assert len(generations) == len(prompts), f"{len(generations)} generations for {len(prompts)} prompts"
        for g in generations:
            assert isinstance(g, Generation), f"returned {type(g).__name__}, expected Generation"
            assert len(g.token_ids) >= 1, "empty response (the EOS at least is expected)"
            assert len(g.logprobs) == len(g.token_ids), f"{len(g.logprobs)} log-probs for {len(g.token_ids)} tokens"
            assert all(math.isfinite(x) and x <= 1e-6 for x in g.logprobs), "log-probs must be finite and ≤ 0"
            assert g.finish_reason in ("stop", "length"), f"finish_reason {g.finish_reason!r}"
        return f"{sum(len(g.token_ids) for g in generations)} tokens"

    return [run_check("exposes temperature / top_p / top_k", sampling_parameters),
            run_check("one log-prob per token, finite, ≤ 0", logprob_lengths)]


def check_plugin(kind: Kind, name: str, options: dict[str, Any], policy: Callable[[], Policy]) -> list[CheckResult]:
    """Load plugin `name` of `kind` with `options` and run its kind's checks."""
    cls = discover(kind)[name].load()
    results = options_checks(cls, options, REQUIRED_BASE.get(kind, BaseModel))
    if not all(r.passed for r in results):
        return results
    plugin = cls(**options)
    if kind == "objectives":
        return results + objective_checks(plugin)
    if kind == "verifiers":
        return results + verifier_checks(plugin)
    return results + sampler_checks(plugin, policy())
