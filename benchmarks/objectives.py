"""Cost of each objective (loss + backward to the log-probs, metrics included) next to the
model's forward + backward on the same batch, on the embedded model.

Side by side in one run: every built-in objective, and MinPRO written the obvious way
(a Python loop over token positions for the running minimum) as the alternative to the
vectorised `cummin`. Log-probs come from a real sampled batch; μ is π_θ with noise
(σ = 0.3 in log space) so clipping and masking branches are taken. Medians of 20 calls
after a warm-up; peak memory is the process's (dominated by the model).

    .venv/bin/python benchmarks/objectives.py
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import GROUP_SIZE, MAX_NEW_TOKENS, N_PROMPTS, measure, sampled_rows, timed

from minpro_cli.logprobs import pack, pad_rows, response_logprobs
from minpro_cli.modeling import load_policy
from minpro_cli.objectives import ObjectiveInputs, ObjectiveOutput
from minpro_cli.objectives.logratios import log_token_ratio
from minpro_cli.registry import discover, load_objective

REPEATS = 20
LONG_SHAPE = (64, 4096)


def median_ms(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    return 1e3 * timed(fn, repeats)[0]


def loss_and_backward(objective: Callable[[ObjectiveInputs], ObjectiveOutput], inputs: ObjectiveInputs) -> None:
    """What a training step spends in the objective: loss, metrics, backward to the log-probs."""
    leaf = inputs.logprobs.detach().clone().requires_grad_(True)
    objective(ObjectiveInputs(leaf, inputs.old_logprobs, inputs.advantages, inputs.response_mask)).loss.backward()


def minpro_token_loop(inputs: ObjectiveInputs) -> ObjectiveOutput:
    """MinPRO (cispo clip, token-mean) with the running minimum as a loop over positions."""
    mask = inputs.response_mask
    log_rho = log_token_ratio(inputs.logprobs, inputs.old_logprobs).detach()
    running = torch.full_like(log_rho[:, 0], float("inf"))
    weights = []
    for t in range(log_rho.shape[1]):
        prefix = torch.where(torch.isinf(running), torch.zeros_like(running), running)
        weights.append((prefix + log_rho[:, t]).exp().clamp(0.0, 1.2))
        running = torch.where(mask[:, t], torch.minimum(running, log_rho[:, t]), running)
    weight = torch.stack(weights, dim=1)
    per_token = -weight * inputs.token_advantages() * inputs.logprobs
    return ObjectiveOutput((per_token * mask).sum() / mask.sum())


def run() -> tuple[float, int]:
    policy = load_policy("embedded")
    rows = sampled_rows(policy)
    packed = pack([r.prompt_token_ids for r in rows], [r.response_token_ids for r in rows], policy.pad_token_id)
    mask = packed.response_mask
    n_tokens = int(mask.sum())
    policy.model.train()

    def forward_backward() -> torch.Tensor:
        policy.model.zero_grad(set_to_none=True)
        logprobs, _ = response_logprobs(policy.model, packed)
        (-logprobs[mask].mean()).backward()
        return logprobs

    logprobs = forward_backward().detach()
    model_ms = median_ms(forward_backward, repeats=5)
    gen = torch.Generator().manual_seed(0)
    old = logprobs + 0.3 * torch.randn(logprobs.shape, generator=gen)
    old = torch.where(mask, old, pad_rows([r.behavior_logprobs for r in rows], logprobs))
    advantages = torch.randn(len(rows), generator=gen)

    candidates: list[tuple[str, Callable[[ObjectiveInputs], ObjectiveOutput]]] = [
        ("minpro", load_objective("minpro")),
        ("minpro, loop over tokens", minpro_token_loop),
        ("minpro, clip_mode=ppo", load_objective("minpro", clip_mode="ppo")),
        *((name, load_objective(name)) for name in sorted(discover("objectives")) if name != "minpro"),
    ]

    print(f"embedded model, {N_PROMPTS} prompts x {GROUP_SIZE} samples, max {MAX_NEW_TOKENS} new tokens: "
          f"batch {tuple(mask.shape)}, {n_tokens} response tokens, {torch.get_num_threads()} threads")
    print(f"{'step':28s} {'ms':>8s} {'% of model fwd+bwd':>19s} {'tokens/s':>12s}")
    print(f"{'model forward + backward':28s} {model_ms:8.2f} {100.0:18.1f}% {n_tokens / model_ms * 1e3:12.0f}")
    for name, objective in candidates:
        inputs = ObjectiveInputs(logprobs, old, advantages, mask)
        ms = median_ms(lambda objective=objective, inputs=inputs: loss_and_backward(objective, inputs))
        print(f"{name:28s} {ms:8.2f} {100 * ms / model_ms:18.1f}% {n_tokens / ms * 1e3:12.0f}")
    return 0.0, n_tokens


def long_responses() -> tuple[float, int]:
    """Reasoning-length responses (no model): where a loop over positions starts to cost."""
    gen = torch.Generator().manual_seed(0)
    rows, width = LONG_SHAPE
    logprobs = -torch.rand(rows, width, generator=gen)
    old = logprobs + 0.3 * torch.randn(rows, width, generator=gen)
    mask = torch.arange(width)[None, :] < torch.randint(width // 4, width + 1, (rows, 1), generator=gen)
    advantages = torch.randn(rows, generator=gen)

    n_tokens = int(mask.sum())
    print(f"\nsynthetic long responses: batch {LONG_SHAPE}, {n_tokens} response tokens")
    for name, objective in [("minpro", load_objective("minpro")), ("minpro, loop over tokens", minpro_token_loop)]:
        inputs = ObjectiveInputs(logprobs, old, advantages, mask)
        ms = median_ms(lambda objective=objective, inputs=inputs: loss_and_backward(objective, inputs), 5)
        print(f"{name:28s} {ms:8.2f} ms {n_tokens / ms * 1e3:12.0f} tokens/s")
    return 0.0, n_tokens


def main() -> None:
    print(f"peak memory of the process: {measure(run).peak_mb:.0f} MB")
    print(f"peak memory of the process: {measure(long_responses).peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
