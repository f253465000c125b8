"""Log-probs of the same responses as the trainer computes them, in every arrangement the
checks compare: alone, batched, in micro-batches, with more padding; and under the sampler's
own settings (temperature, top-p, top-k), from the full vocabulary."""

from __future__ import annotations

import torch

from minpro_cli.logprobs import micro_batches, pack, response_logprobs
from minpro_cli.modeling import Policy
from minpro_cli.samplers.hf import truncate_logits

PROCESSED_ROWS = 4  # rows per full-vocabulary forward: 4 × R × V float32 logits at a time


def trainer_logprobs(
    policy: Policy, prompts: list[list[int]], responses: list[list[int]], temperature: float,
    groups: list[list[int]] | None = None, filler: list[int] | None = None,
) -> list[torch.Tensor]:  # fmt: skip
    """log π of each response's tokens through the trainer's own path (`pack` →
    `response_logprobs`, the policy's autocast), the rows scored together in `groups` (index
    lists; default one batch). `filler`: a prompt packed into every group and dropped, so the
    group's prompts get that much more left padding."""
    out: list[torch.Tensor | None] = [None] * len(prompts)
    for group in groups or [list(range(len(prompts)))]:
        rows_p, rows_r = [prompts[i] for i in group], [responses[i] for i in group]
        if filler is not None:
            rows_p, rows_r = [*rows_p, filler], [*rows_r, responses[group[0]]]
        with torch.no_grad(), policy.autocast():
            scored, _ = response_logprobs(policy.model, pack(rows_p, rows_r, policy.pad_token_id), temperature)
        for row, i in enumerate(group):
            out[i] = scored[row, : len(responses[i])].float().cpu()
    return [t for t in out if t is not None]


def budget_groups(prompts: list[list[int]], responses: list[list[int]], budget: int | None) -> list[list[int]]:
    """The trainer's micro-batches for a token budget (train.micro_batch_tokens)."""
    return micro_batches([len(p) for p in prompts], [len(r) for r in responses], budget)


def processed_logprobs(
    policy: Policy, prompts: list[list[int]], responses: list[list[int]], temperature: float, top_p: float = 1.0,
    top_k: int = 0,
) -> list[torch.Tensor]:  # fmt: skip
    """log of softmax(truncate(logits / T)) at each response token: the distribution a sampler
    with these settings draws from, as the `hf` sampler computes it. A token outside the
    truncated support gets −inf."""
    out: list[torch.Tensor] = []
    for start in range(0, len(prompts), PROCESSED_ROWS):
        rows_p, rows_r = prompts[start : start + PROCESSED_ROWS], responses[start : start + PROCESSED_ROWS]
        batch = pack(rows_p, rows_r, policy.pad_token_id)
        width, device = batch.response_ids.shape[1], policy.model.device
        with torch.no_grad(), policy.autocast():
            logits = policy.model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                                  position_ids=batch.position_ids.to(device)).logits  # fmt: skip
        prompt_len = batch.input_ids.shape[1] - width
        logits = logits[:, prompt_len - 1 : prompt_len - 1 + width].float() / temperature
        logp = torch.log_softmax(truncate_logits(logits, top_k, top_p), dim=-1)
        picked = logp.gather(-1, batch.response_ids.to(device)[..., None]).squeeze(-1).cpu()
        out.extend(picked[row, : len(r)] for row, r in enumerate(rows_r))
    return out
