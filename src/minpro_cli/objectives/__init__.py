"""Objectives: pure tensor functions from per-token log-probs to a scalar loss.

Public API for plugin authors::

    from minpro_cli.objectives import ObjectiveInputs, ObjectiveOptions, ObjectiveOutput

An objective plugin is a subclass of `ObjectiveOptions` (a Pydantic model: its fields are
the objective's options, validated on load) whose `__call__` maps `ObjectiveInputs` to
`ObjectiveOutput`. No model and no optimizer inside: only tensors in, loss and metrics out.
Register it under the `minpro.objectives` entry-point group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
LOG_RATIO_CLAMP = 20.0  # exp(±20) stays finite in fp32; beyond it a ratio is meaningless anyway


@dataclass
class ObjectiveInputs:
    logprobs: torch.Tensor  # (B, T) log π_θ of the response tokens, requires grad
    old_logprobs: torch.Tensor  # (B, T) log μ of the behaviour policy, no grad
    advantages: torch.Tensor  # (B,) per sequence or (B, T) per token
    response_mask: torch.Tensor  # (B, T) bool, True on trained response tokens
    proximal_logprobs: torch.Tensor | None = None  # (B, T) optional proximal policy

    def token_advantages(self) -> torch.Tensor:
        adv = self.advantages
        return adv.unsqueeze(-1).expand_as(self.logprobs) if adv.dim() == 1 else adv


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # scalar, differentiable w.r.t. logprobs
    metrics: dict[str, float] = field(default_factory=dict)  # detached


class ObjectiveOptions(BaseModel):
    """Base of every objective's options; unknown options are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    loss_agg: LossAgg = Field("token-mean", description="how per-token losses become one scalar")

    def __call__(self, inputs: ObjectiveInputs) -> ObjectiveOutput:
        raise NotImplementedError


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, mode: LossAgg) -> torch.Tensor:
    """Reduce (B, T) per-token losses over the response tokens.

    token-mean:           Σ_{i,t} ℓ_it / Σ_i |o_i|
    seq-mean-token-mean:  (1/B) Σ_i (1/|o_i|) Σ_t ℓ_it
    seq-mean-token-sum:   (1/B) Σ_i Σ_t ℓ_it
    """
    maskf = mask.to(per_token.dtype)
    masked = per_token * maskf
    if mode == "token-mean":
        return masked.sum() / maskf.sum().clamp(min=1.0)
    seq_sum = masked.sum(-1)
    if mode == "seq-mean-token-mean":
        return (seq_sum / maskf.sum(-1).clamp(min=1.0)).mean()
    if mode == "seq-mean-token-sum":
        return seq_sum.mean()
    raise ValueError(f"unknown loss_agg {mode!r}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    n = int(mask.sum())
    return float(values[mask].float().sum() / n) if n else float("nan")


def masked_min(values: torch.Tensor, mask: torch.Tensor) -> float:
    return float(values[mask].min()) if bool(mask.any()) else float("nan")
