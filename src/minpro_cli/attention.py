"""Attention as `transformers`' SDPA, except where this CPU's bf16 kernel is slow: short sequences.

PyTorch's CPU flash-attention kernel takes 2-3x longer over a bf16 backward than over a float32
one on sequences under ~250 tokens (RL rows: prompt + response, 50-200 tokens); from ~250 tokens
on, bf16 is faster (`benchmarks/attention_precision.py`). So a query of 2 to `FLOAT32_BELOW - 1`
positions computed in bf16 or fp16 on the CPU is attended to in float32 and cast back; decoding
(one position) and every other case go to SDPA as they are. The rule depends on shapes and
dtypes only, never on grad mode, so a no-grad forward (π_old, the reference) and the training
forward of the same rows run the same kernel.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "minpro_sdpa"
FLOAT32_BELOW = 256  # query positions: the crossover measured at 2 threads (bf16 faster from ~240)
LOW_PRECISION = (torch.bfloat16, torch.float16)


def install(model: PreTrainedModel) -> None:
    """Route a model's attention through `attention_forward` if it runs SDPA (else leave it be)."""
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(NAME)


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """SDPA (`transformers`' own wrapper: GQA, masks, causality), in float32 where `in_float32`."""
    if not in_float32(query):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    with torch.autocast(query.device.type, enabled=False):
        out, _ = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(query.dtype), None


def in_float32(query: torch.Tensor) -> bool:
    """Under autocast SDPA computes in autocast's dtype, whatever the query's (RoPE leaves it float32)."""
    device = query.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    return device == "cpu" and dtype in LOW_PRECISION and 1 < query.shape[2] < FLOAT32_BELOW


AttentionInterface.register(NAME, attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # the same boolean masks as SDPA
