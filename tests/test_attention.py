"""Attention routed through `minpro_cli.attention`: float32 for short low-precision queries on the
CPU, SDPA as is otherwise; checked against a float64 loop over positions."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from minpro_cli import attention
from minpro_cli.modeling import load_policy

HEADS, KV_HEADS, DIM = 4, 2, 16
MODULE = SimpleNamespace(num_key_value_groups=HEADS // KV_HEADS, is_causal=True, training=False)


def inputs(length: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q, k, v of 3 rows (GQA: 4 query heads on 2 key/value heads) and a causal mask with left
    padding: row r's first 2r positions are padding."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(3, HEADS, length, DIM, generator=gen).to(dtype)
    k, v = (torch.randn(3, KV_HEADS, length, DIM, generator=gen).to(dtype) for _ in range(2))
    mask = torch.ones(length, length, dtype=torch.bool).tril().repeat(3, 1, 1, 1)
    for row in range(3):
        mask[row, :, :, : 2 * row] = False
    mask |= torch.eye(length, dtype=torch.bool)  # a padding query attends to itself, not to nothing
    return q, k, v, mask


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√d over allowed keys)·v in float64, one row, head and query position at a time;
    [rows, positions, heads, dim] as transformers returns it."""
    rows, heads, length, dim = q.shape
    out = torch.zeros(rows, length, heads, dim, dtype=torch.float64)
    for r in range(rows):
        for h in range(heads):
            kv = h // (heads // k.shape[1])
            for t in range(length):
                keys = [j for j in range(length) if mask[r, 0, t, j]]
                scores = torch.stack([q[r, h, t].double() @ k[r, kv, j].double() for j in keys]) / math.sqrt(dim)
                weights = torch.softmax(scores, dim=0)
                out[r, t, h] = sum(w * v[r, kv, j].double() for w, j in zip(weights, keys, strict=True))
    return out


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    groups = HEADS // KV_HEADS
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), mask)
    return out.transpose(1, 2)


@pytest.mark.parametrize("length", [2, 9, 40])
def test_short_bf16_queries_are_attended_in_float32(length: int) -> None:
    q, k, v, mask = inputs(length, torch.bfloat16)
    out, _ = attention.attention_forward(MODULE, q, k, v, mask)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, sdpa(q.float(), k.float(), v.float(), mask).to(torch.bfloat16))
    # float32 attention of the bf16 inputs, then one rounding to bf16: within half a bf16 ulp
    exact = reference(q, k, v, mask)
    assert ((out.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()


def test_gradients_match_the_float64_reference() -> None:
    q, k, v, mask = inputs(12, torch.bfloat16, seed=1)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, _ = attention.attention_forward(MODULE, *leaves, mask)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out.float() * probe).sum().backward()
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    (reference(*exact, mask) * probe.double()).sum().backward()
    for got, want in zip(leaves, exact, strict=True):
        assert torch.allclose(got.grad.double(), want.grad, rtol=2e-2, atol=2e-2)


def test_autocast_decides_the_precision_not_the_query_dtype() -> None:
    """Under autocast, RoPE hands SDPA a float32 query that it computes in bf16: still float32 here."""
    q, k, v, mask = inputs(9, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = attention.attention_forward(MODULE, q.float(), k.float(), v, mask)
    assert torch.equal(out, sdpa(q.float(), k.float(), v.float(), mask))


@pytest.mark.parametrize(
    ("length", "dtype"),
    [(1, torch.bfloat16), (attention.FLOAT32_BELOW, torch.bfloat16), (9, torch.float32)],
    ids=["decode", "long", "float32"],
)
def test_other_cases_run_sdpa_as_is(length: int, dtype: torch.dtype) -> None:
    q, k, v, mask = inputs(length, dtype)
    if length == 1:
        mask = None
    out, _ = attention.attention_forward(MODULE, q, k, v, mask)
    assert torch.equal(out, sdpa(q, k, v, mask).to(dtype))


def test_loaded_models_use_it_and_grad_mode_does_not_change_the_kernel() -> None:
    """The training forward and a no-grad forward of the same rows (π_old, the reference) agree
    bit for bit under bf16 autocast: the routing depends on shapes, never on grad mode."""
    model = load_policy("embedded").model
    assert model.config._attn_implementation == attention.NAME
    ids = torch.randint(3, 60, (4, 30), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            frozen = model(input_ids=ids).logits
        trained = model(input_ids=ids).logits
    assert trained.requires_grad
    assert torch.equal(frozen, trained.detach())
