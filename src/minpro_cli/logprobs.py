"""Scoring responses: prompt + response rows packed into one batch, and the log-probs (and
entropy) of the response tokens through a chunked head that never holds the whole vocabulary's
logits for the whole batch, with their gradients; autocast to the compute precision."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class PackedBatch:
    """Prompts left-padded to a shared end column, responses right-padded after it.

    Response token j of row i sits at column P + j, so the logits that predict it are at
    column P + j - 1 for every row: one slice, no per-row gather.
    """

    input_ids: torch.Tensor  # (B, P + R)
    attention_mask: torch.Tensor  # (B, P + R)
    position_ids: torch.Tensor  # (B, P + R)
    response_ids: torch.Tensor  # (B, R)
    response_mask: torch.Tensor  # (B, R) bool


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> PackedBatch:
    """Rows built as Python lists and turned into tensors once (not one copy per row)."""
    prompt_len = max(len(p) for p in prompts)
    response_len = max(1, max(len(r) for r in responses))
    ids, attention, response_mask = [], [], []
    for p, r in zip(prompts, responses):
        left, right = prompt_len - len(p), response_len - len(r)
        ids.append([pad_id] * left + p + r + [pad_id] * right)
        attention.append([0] * left + [1] * (len(p) + len(r)) + [0] * right)
        response_mask.append([True] * len(r) + [False] * right)
    input_ids, attention_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(attention, dtype=torch.long)
    return PackedBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions_from_mask(attention_mask),
        response_ids=input_ids[:, prompt_len:],
        response_mask=torch.tensor(response_mask, dtype=torch.bool),
    )


def pad_versions(rows: list[list[int]], mask: torch.Tensor) -> torch.Tensor:
    """Per-token policy versions (`behavior_versions`) as a (B, T) int64 tensor on `mask`'s device,
    each row's last version repeated over its padding (a padded position is never a version
    boundary); an empty row is all 0."""
    width = mask.shape[1]
    padded = [row[:width] + [row[-1] if row else 0] * (width - len(row)) for row in rows]
    return torch.tensor(padded, dtype=torch.int64).to(mask.device, non_blocking=True)


def pad_rows(rows: list[list[float]], like: torch.Tensor) -> torch.Tensor:
    """Per-row lists right-padded with zeros into a tensor of the shape, dtype and device of `like`."""
    width = like.shape[1]
    padded = [row + [0.0] * (width - len(row)) for row in rows]  # one host tensor, moved once
    return torch.tensor(padded, dtype=like.dtype).reshape(like.shape).to(like.device, non_blocking=True)


def micro_batches(prompt_lengths: list[int], response_lengths: list[int], budget: int | None) -> list[list[int]]:
    """Row indices of each micro-batch. A packed micro-batch holds rows × (longest prompt +
    longest response) tokens; rows go longest first into the current micro-batch while that
    stays within `budget` (a row over the budget alone gets one). None: one micro-batch, in order."""
    n = len(prompt_lengths)
    if budget is None or n == 0:
        return [list(range(n))] if n else []
    responses = [max(n, 1) for n in response_lengths]  # `pack` pads responses to at least 1 column
    order = sorted(range(n), key=lambda i: prompt_lengths[i] + responses[i], reverse=True)
    out: list[list[int]] = []
    current: list[int] = []
    widest_prompt = widest_response = 0
    for i in order:
        prompt, response = max(widest_prompt, prompt_lengths[i]), max(widest_response, responses[i])
        if current and (len(current) + 1) * (prompt + response) > budget:
            out.append(current)
            current, prompt, response = [], prompt_lengths[i], responses[i]
        current.append(i)
        widest_prompt, widest_response = prompt, response
    return [*out, current]


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left padding must not shift positions: the first real token is position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# logit post-processing after the head (soft-capping, scaling): such models take the
# full-vocabulary path, since the chunked head reproduces a plain linear layer only
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier")
CHUNK_ELEMENTS = 2**25  # tokens × vocabulary entries per chunk: 128 MB of float32 logits


def chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk of the head: ~2^25 logits, e.g. 682 tokens at 49k, 221 at 152k."""
    return max(1, CHUNK_ELEMENTS // vocab_size)


def autocast(device: torch.device | str, dtype: torch.dtype) -> contextlib.AbstractContextManager[None]:
    """Compute in `dtype` while weights (and AdamW states) stay float32: mixed precision."""
    device_type = torch.device(device).type
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def response_logprobs(
    model: torch.nn.Module,
    batch: PackedBatch,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(o_t | q, o_<t) of each response token (B, R) float32, from logits / temperature.

    The head runs chunk by chunk over the response tokens (`ChunkedLogProbs`): memory is
    O(B·R + chunk·V), never a (B, R, V) float32 tensor, and padding costs nothing past the
    decoder. Entropy of the same distribution comes from the same chunks when asked: detached,
    or differentiable with `entropy_grad` (an entropy bonus), at no cost until it is used.
    `model` may be wrapped (DDP, FSDP2): forward goes through the wrapper.
    """
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    head = inner.get_output_embeddings()
    device = next(model.parameters()).device
    if not isinstance(head, torch.nn.Linear) or any(
        getattr(inner.config, key, None) not in (None, 1, 1.0) for key in LOGIT_TRANSFORMS
    ):
        return _full_vocabulary_logprobs(model, batch, temperature, with_entropy, entropy_grad)
    inner.set_output_embeddings(torch.nn.Identity())  # the model returns hidden states
    try:
        hidden = _forward_response_columns(model, batch, device)
    finally:
        inner.set_output_embeddings(head)
    mask = batch.response_mask.to(device)
    targets = batch.response_ids.to(device)[mask]
    logprobs, entropy = ChunkedLogProbs.apply(
        hidden[mask], head.weight, head.bias, targets, temperature, with_entropy, chunk_tokens(head.out_features)
    )
    zeros = torch.zeros(mask.shape, dtype=logprobs.dtype, device=device)
    if not with_entropy:
        return zeros.masked_scatter(mask, logprobs), None
    return zeros.masked_scatter(mask, logprobs), zeros.masked_scatter(mask, entropy if entropy_grad else entropy.detach())


def _forward_response_columns(model: torch.nn.Module, batch: PackedBatch, device: torch.device) -> torch.Tensor:
    """The model's output at the columns that predict the response tokens: (B, R, ·)."""
    response_len = batch.response_ids.shape[1]
    return model(
        input_ids=batch.input_ids.to(device, non_blocking=True),
        attention_mask=batch.attention_mask.to(device, non_blocking=True),
        position_ids=batch.position_ids.to(device, non_blocking=True),
        logits_to_keep=response_len + 1,
        use_cache=False,
    ).logits[:, :-1]


def _full_vocabulary_logprobs(
    model: torch.nn.Module, batch: PackedBatch, temperature: float, with_entropy: bool, entropy_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's own logits (whatever follows its head), log-softmax over the full vocabulary."""
    device = next(model.parameters()).device
    logits = _forward_response_columns(model, batch, device)
    logp_all = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)
    logprobs = logp_all.gather(-1, batch.response_ids.to(device).unsqueeze(-1)).squeeze(-1)
    logprobs = logprobs * batch.response_mask.to(device)
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):  # a second (B, R, V) in the graph
            entropy = -(logp_all.exp() * logp_all).sum(-1) * batch.response_mask.to(device)
    return logprobs, entropy


class ChunkedLogProbs(torch.autograd.Function):
    """log softmax(h·Wᵀ + b)/T at the target ids, and the entropy, `chunk` tokens at a time.

    Forward keeps only h (N, H), the targets and log Z per token; backward recomputes each
    chunk's logits z and p = exp(z − log Z):
        ∂ log p_y / ∂z = (onehot(y) − softmax(z)) / T
        ∂h = g·(onehot − p)/T · W        ∂W = Σ_chunks ((onehot − p)/T · g)ᵀ · h
    Logits are formed in the compute dtype (autocast's, else h's) and reduced in float32
    (float64 inputs stay float64). Entropy H = log Z − Σ p·z comes from the same exp pass;
    when a loss uses it (entropy bonus), backward adds ∂H/∂z = −p·(log p + H)/T.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        temperature: float,
        with_entropy: bool,
        chunk: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device_type = hidden.device.type
        compute = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        ctx.compute, ctx.temperature, ctx.chunk = compute, temperature, chunk
        accumulate = torch.promote_types(compute, torch.float32)
        logprobs = torch.empty(hidden.shape[0], dtype=accumulate, device=hidden.device)
        entropy = torch.zeros_like(logprobs)
        normaliser = torch.empty_like(logprobs)  # log Z per token, kept for backward's softmax
        w, b = weight.to(compute), None if bias is None else bias.to(compute)  # cast once, not per chunk
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = _chunk_logits(hidden[rows], w, b, temperature)
            if with_entropy:  # one exp pass gives both log Z and H = log Z − Σ p·z
                peak = logits.amax(-1, keepdim=True)
                unnormalised = (logits - peak).exp_()
                total = unnormalised.sum(-1)
                normaliser[rows] = peak.squeeze(-1) + total.log()
                entropy[rows] = normaliser[rows] - (unnormalised * logits).sum(-1) / total
            else:
                normaliser[rows] = logits.logsumexp(-1)
            logprobs[rows] = logits.gather(-1, targets[rows, None]).squeeze(-1) - normaliser[rows]
        ctx.save_for_backward(hidden, weight, bias, targets, normaliser, entropy)
        ctx.set_materialize_grads(False)  # an unused output gets None: no entropy term in backward
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_logprobs: torch.Tensor | None, grad_entropy: torch.Tensor | None
    ) -> tuple[Any, ...]:
        hidden, weight, bias, targets, normaliser, entropy = ctx.saved_tensors
        compute, temperature, chunk = ctx.compute, ctx.temperature, ctx.chunk
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        accumulate = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=accumulate, device=weight.device) if need_bias else None
        w, b = weight.to(compute), None if bias is None else bias.to(compute)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            n = min(chunk, hidden.shape[0] - start)
            if grad_logprobs is None:  # only the entropy is in the loss
                g = torch.zeros(n, dtype=accumulate, device=hidden.device)
            else:
                g = grad_logprobs[rows].to(accumulate) / temperature
            log_p = _chunk_logits(hidden[rows], w, b, temperature).sub_(normaliser[rows, None])  # from the saved log Z
            if grad_entropy is None:  # ∂/∂z of g·log p_y: g·(onehot − p)
                grad_logits = log_p.exp_().mul_(-g[:, None])
            else:  # … plus gH·∂H/∂z = −gH·p·(log p + H)
                gh = grad_entropy[rows].to(accumulate) / temperature
                factor = (log_p + entropy[rows, None]).mul_(gh[:, None]).add_(g[:, None])
                grad_logits = log_p.exp_().mul_(factor).neg_()
            grad_logits[torch.arange(n, device=g.device), targets[rows]] += g
            grad_compute = grad_logits.to(compute)
            if grad_hidden is not None:
                grad_hidden[rows] = (grad_compute @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (grad_compute.T @ hidden[rows].to(compute)).to(accumulate)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None, None, None, None,
        )  # fmt: skip


def _chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    """(chunk, V) logits / T: formed in the dtype of `weight` (the compute dtype), reduced in ≥ float32."""
    logits = hidden.to(weight.dtype) @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = logits.to(torch.promote_types(weight.dtype, torch.float32))
    return logits / temperature if temperature != 1.0 else logits
