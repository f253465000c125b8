"""Loop-based reference of every built-in objective, in plain Python floats.

Written from the formulas, not from the vectorised code: one token at a time, no torch.
Each objective's loss is L = Σ_{b,t} c_{bt} · ℓ_{bt}, where c is the aggregation weight of
token (b, t) and ℓ its per-token loss. Every objective's per-token loss depends on log π_θ of
its own token only (prefix and sequence ratios enter detached), so the gradient is
∂L/∂log π_{bt} = c_{bt} · ∂ℓ_{bt}/∂log π_{bt}, also written out by hand below.
"""

from __future__ import annotations

import math
from typing import Any

CLAMP = 20.0

DEFAULTS: dict[str, dict[str, Any]] = {
    "minpro": {"eps_low": 1.0, "eps_high": 0.2, "loss_agg": "token-mean", "prefix_cap_at_one": False,
               "clip_mode": "cispo"},
    "grpo": {"eps_low": 0.2, "eps_high": 0.2, "loss_agg": "seq-mean-token-mean", "dual_clip": None},
    "dapo": {"eps_low": 0.2, "eps_high": 0.28, "loss_agg": "token-mean", "dual_clip": None},
    "dr_grpo": {"eps_low": 0.2, "eps_high": 0.2, "loss_agg": "seq-mean-token-sum-norm", "dual_clip": None},
    "gspo": {"eps_low": 3e-4, "eps_high": 4e-4, "loss_agg": "seq-mean-token-mean"},
    "cispo": {"eps_low": 1.0, "eps_high": 0.2, "loss_agg": "token-mean"},
    "prefix": {"eps_low": 1.0, "eps_high": 0.2, "loss_agg": "token-mean"},
    "m2po": {"m2_threshold": 0.04, "loss_agg": "token-mean"},
}


def clamp(x: float, low: float, high: float) -> float:
    return min(max(x, low), high)


def coefficients(mask: list[list[bool]], mode: str, max_len: int | None) -> list[list[float]]:
    rows, width = len(mask), len(mask[0])
    lengths = [sum(row) for row in mask]
    n_tokens = sum(lengths)
    nonempty = sum(1 for n in lengths if n > 0)
    longest = max([1, *(t + 1 for row in mask for t in range(width) if row[t])])  # last trained column
    out = []
    for b in range(rows):
        row = []
        for t in range(width):
            if not mask[b][t]:
                row.append(0.0)
            elif mode == "token-mean":
                row.append(1.0 / n_tokens)
            elif mode == "seq-mean-token-mean":
                row.append(1.0 / (nonempty * lengths[b]))
            elif mode == "seq-mean-token-sum":
                row.append(1.0 / nonempty)
            elif mode == "seq-mean-token-sum-norm":
                row.append(1.0 / (rows * (max_len if max_len is not None else longest)))
            else:
                raise ValueError(mode)
        out.append(row)
    return out


def ppo_term(r: float, a: float, low: float, high: float, dual: float | None, grad_flows: bool) -> tuple[float, float]:
    """ℓ = max(−A·r, −A·clip(r)) (dual: min(ℓ, −A·c) for A < 0); dℓ/dlog π = −A·r unless clipped."""
    loss = max(-a * r, -a * clamp(r, low, high))
    clipped = (a > 0 and r > high) or (a < 0 and r < low)
    if dual is not None and a < 0:
        loss = min(loss, -a * dual)
        clipped = clipped or r > dual
    return loss, (0.0 if clipped or not grad_flows else -a * r)


def detached_term(w: float, a: float, logp: float, low: float, high: float) -> tuple[float, float]:
    """ℓ = −sg[clip(w)]·A·log π; dℓ/dlog π = −clip(w)·A."""
    wc = clamp(w, low, high)
    return -wc * a * logp, -wc * a


def m2po_keep(log_ratios: list[tuple[int, int, float]], tau: float) -> set[tuple[int, int]]:
    """The authors' greedy loop: while mean (log ρ)² of kept tokens > τ, drop the largest."""
    kept = {(b, t): lr * lr for b, t, lr in log_ratios}
    while kept and sum(kept.values()) / len(kept) > tau:
        kept.pop(max(kept, key=kept.__getitem__))
    return set(kept)


def reference(name: str, options: dict[str, Any], logp: list[list[float]], old: list[list[float]],
              adv: list[list[float]], mask: list[list[bool]]) -> tuple[float, list[list[float]]]:
    """Loss and ∂loss/∂logp of objective `name` with `options` (adv given per token)."""
    o = {**DEFAULTS[name], **options}
    low, high = 1.0 - o.get("eps_low", 0.0), 1.0 + o.get("eps_high", 0.0)
    rows, width = len(logp), len(logp[0])
    coef = coefficients(mask, o["loss_agg"], o.get("max_response_length"))
    diff = [[logp[b][t] - old[b][t] for t in range(width)] for b in range(rows)]
    log_rho = [[clamp(d, -CLAMP, CLAMP) for d in row] for row in diff]
    keep = set()
    if name == "m2po":
        trained = [(b, t, log_rho[b][t]) for b in range(rows) for t in range(width) if mask[b][t]]
        keep = m2po_keep(trained, o["m2_threshold"])
    loss, grad = 0.0, [[0.0] * width for _ in range(rows)]
    for b in range(rows):
        trained_lr = [log_rho[b][t] for t in range(width) if mask[b][t]]
        log_seq = sum(trained_lr) / len(trained_lr) if trained_lr else 0.0
        for t in range(width):
            if not mask[b][t]:
                continue
            a, lr = adv[b][t], log_rho[b][t]
            flows = abs(diff[b][t]) <= CLAMP  # clamp(·) passes no gradient outside ±20
            if name in ("grpo", "dapo", "dr_grpo"):
                term = ppo_term(math.exp(lr), a, low, high, o["dual_clip"], flows)
            elif name == "gspo":  # value s_b, gradient through log π of the token itself
                term = ppo_term(math.exp(log_seq), a, low, high, None, True)
            elif name == "cispo":
                term = detached_term(math.exp(lr), a, logp[b][t], low, high)
            elif name == "prefix":
                log_prefix = clamp(sum(log_rho[b][i] for i in range(t + 1) if mask[b][i]), -CLAMP, CLAMP)
                term = detached_term(math.exp(log_prefix), a, logp[b][t], low, high)
            elif name == "minpro":
                earlier = [log_rho[b][i] for i in range(t) if mask[b][i]]
                log_min = min(earlier) if earlier else 0.0
                if o["prefix_cap_at_one"]:
                    log_min = min(log_min, 0.0)
                log_w = clamp(log_min + lr, -CLAMP, CLAMP)
                if o["clip_mode"] == "cispo":
                    term = detached_term(math.exp(log_w), a, logp[b][t], low, high)
                else:
                    inside = flows and abs(log_min + lr) <= CLAMP
                    term = ppo_term(math.exp(log_w), a, low, high, None, inside)
            elif name == "m2po":
                m = 1.0 if (b, t) in keep else 0.0
                term = (-m * math.exp(lr) * a, -m * math.exp(lr) * a * flows)
            else:
                raise ValueError(name)
            loss += coef[b][t] * term[0]
            grad[b][t] = coef[b][t] * term[1]
    return loss, grad
