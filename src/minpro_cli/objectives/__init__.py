"""Objectives: pure tensor functions from per-token log-probs to a scalar loss.

Public API for plugin authors::

    from minpro_cli.objectives import Objective, ObjectiveInputs, ObjectiveOutput

An objective plugin is a subclass of `Objective` (a Pydantic model: its fields are
the objective's options, validated on load) whose `__call__` maps `ObjectiveInputs` to
`ObjectiveOutput`. No model and no optimizer inside: only tensors in, loss and metrics out.
It reduces its per-token losses with `self.aggregate(per_token, mask, inputs.counts)`, so
`loss_agg` means the same thing for every objective, and so `minpro train` can normalise every
micro-batch by the counts of its whole minibatch (`inputs.counts`, an explicit input) without
the objective knowing it was cut. Register it under the `minpro.objectives` entry-point group.

The three policies (docs/correction.md): μ sampled the tokens (`behavior_logprobs`), π_old is
the anchor the objective's ratio is taken against (`anchor_logprobs`; μ itself unless
`train.anchor` recomputes it), π_θ is trained (`logprobs`). An objective's ratio is π_θ/π_old;
the sampler's mismatch π_old/μ is the correction layer's, not the objective's.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
AdvantageEstimator = Literal["grpo", "dr_grpo", "rloo"]
LOG_RATIO_CLAMP = 20.0  # exp(±20) stays finite in fp32; beyond it a ratio is meaningless anyway


@dataclass(init=False)
class ObjectiveInputs:
    """What an objective is given, all of it explicit (no hidden state):

    logprobs           (B, T) log π_θ of the response tokens, requires grad
    anchor_logprobs    (B, T) log π_old, the anchor of the objective's ratio, no grad
                       (`old_logprobs` is its alias: plugins written against it keep working)
    advantages         (B,) per sequence or (B, T) per token
    response_mask      (B, T) bool, True on trained response tokens
    behavior_logprobs  (B, T) log μ the sampler recorded (the anchor itself when not given)
    behavior_versions  (B, T) int64, the policy version (optimizer step) that drew each token,
                       or None when unknown
    counts             the whole minibatch's counts the loss is normalised by; None: this batch's
    rewards            (B,) each response's reward (TOPR trains R > 0 apart), or None when not given
    """

    logprobs: torch.Tensor
    anchor_logprobs: torch.Tensor
    advantages: torch.Tensor
    response_mask: torch.Tensor
    behavior_logprobs: torch.Tensor
    behavior_versions: torch.Tensor | None
    counts: MinibatchCounts | None
    proximal_logprobs: torch.Tensor | None
    rewards: torch.Tensor | None

    def __init__(
        self,
        logprobs: torch.Tensor,
        anchor_logprobs: torch.Tensor | None = None,
        advantages: torch.Tensor | None = None,
        response_mask: torch.Tensor | None = None,
        proximal_logprobs: torch.Tensor | None = None,
        *,
        behavior_logprobs: torch.Tensor | None = None,
        behavior_versions: torch.Tensor | None = None,
        counts: MinibatchCounts | None = None,
        rewards: torch.Tensor | None = None,
        old_logprobs: torch.Tensor | None = None,
    ) -> None:
        if old_logprobs is not None:
            if anchor_logprobs is not None:
                raise TypeError("give anchor_logprobs or its old name old_logprobs, not both")
            anchor_logprobs = old_logprobs
        if anchor_logprobs is None or advantages is None or response_mask is None:
            raise TypeError("ObjectiveInputs needs logprobs, anchor_logprobs, advantages and response_mask")
        self.logprobs, self.anchor_logprobs = logprobs, anchor_logprobs
        self.advantages, self.response_mask = advantages, response_mask
        self.behavior_logprobs = anchor_logprobs if behavior_logprobs is None else behavior_logprobs
        self.behavior_versions, self.counts, self.proximal_logprobs = behavior_versions, counts, proximal_logprobs
        self.rewards = rewards

    @property
    def old_logprobs(self) -> torch.Tensor:
        """The anchor π_old under its first name (objectives written before the three policies)."""
        return self.anchor_logprobs

    @old_logprobs.setter
    def old_logprobs(self, value: torch.Tensor) -> None:
        self.anchor_logprobs = value

    def token_advantages(self) -> torch.Tensor:
        adv = self.advantages
        return adv.unsqueeze(-1).expand_as(self.logprobs) if adv.dim() == 1 else adv


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # scalar, differentiable w.r.t. logprobs
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)  # floats or detached 0-d tensors


class Objective(BaseModel):
    """Base of every objective: its options (unknown options are errors) and, as `__call__`,
    the loss they configure.

    Class attributes a plugin may override: `uses_prefix_weight` (the objective weights a
    token by its prefix, so `minpro train` warns about truncated sampling),
    `default_advantage` (the advantage estimator used when the recipe names none) and
    `couples_rows` (a token's loss depends on the other rows it is given, so the update depends
    on how a minibatch is cut: `minpro train` warns under micro-batches, the split check is waived).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    uses_prefix_weight: ClassVar[bool] = False
    default_advantage: ClassVar[AdvantageEstimator] = "grpo"
    couples_rows: ClassVar[bool] = False  # a token's loss depends on other rows of the batch (M2PO's mask)

    loss_agg: LossAgg = Field("token-mean", description="how per-token losses become one scalar")
    max_response_length: int | None = Field(
        None,
        ge=1,
        description="constant normaliser L of seq-mean-token-sum-norm (default: the sampler's max_new_tokens "
        "in minpro train, else the longest response of the minibatch)",
    )

    @model_validator(mode="after")
    def _normaliser_only_where_used(self) -> Objective:
        if self.max_response_length is not None and self.loss_agg != "seq-mean-token-sum-norm":
            raise ValueError(
                f"max_response_length is only used by loss_agg=seq-mean-token-sum-norm, not {self.loss_agg}"
            )
        return self

    def __call__(self, inputs: ObjectiveInputs) -> ObjectiveOutput:
        raise NotImplementedError

    def aggregate(
        self, per_token: torch.Tensor, mask: torch.Tensor, counts: MinibatchCounts | None = None
    ) -> torch.Tensor:
        """`loss_agg` of the per-token losses, normalised by `counts` (pass `inputs.counts`)."""
        return aggregate_loss(per_token, mask, self.loss_agg, self.max_response_length, counts)


ObjectiveOptions = Objective  # deprecated name: plugins written against it keep working


@dataclass(frozen=True)
class MinibatchCounts:
    """The counts a minibatch's loss is normalised by, over all of it: every micro-batch on
    every rank. `length` is L of seq-mean-token-sum-norm when the objective pins none."""

    tokens: int  # Σ_i |o_i|, trained tokens
    sequences: int  # rows with at least one trained token
    rows: int  # all rows, fully masked ones included (Dr.GRPO's B)
    length: int  # the longest response, or the generation budget minpro train sets

    @classmethod
    def of_lengths(cls, lengths: Sequence[int], length: int | None = None) -> MinibatchCounts:
        """Counts of rows with `lengths` trained tokens each."""
        return cls(
            tokens=sum(lengths),
            sequences=sum(1 for n in lengths if n > 0),
            rows=len(lengths),
            length=length if length is not None else max([1, *lengths]),
        )

    @classmethod
    def of_mask(cls, mask: torch.Tensor) -> MinibatchCounts:
        """Counts of one (B, T) batch; its longest response ends at its last trained column."""
        columns = torch.arange(1, mask.shape[-1] + 1, device=mask.device)
        span = int((mask * columns).max()) if mask.numel() else 0
        return cls.of_lengths([int(n) for n in mask.sum(-1).tolist()], max(span, 1))


_MINIBATCH: ContextVar[MinibatchCounts | None] = ContextVar("minpro_minibatch_counts", default=None)


@contextmanager
def minibatch_counts(counts: MinibatchCounts) -> Iterator[None]:
    """Deprecated (kept for one release): the counts as hidden state, for objectives that call
    `aggregate(per_token, mask)` without `inputs.counts`. Inside this block such a call divides
    by `counts` (with a DeprecationWarning) instead of the batch's own counts."""
    token = _MINIBATCH.set(counts)
    try:
        yield
    finally:
        _MINIBATCH.reset(token)


def aggregate_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: LossAgg,
    max_response_length: int | None = None,
    counts: MinibatchCounts | None = None,
) -> torch.Tensor:
    """Reduce (B, T) per-token losses ℓ_it over the trained tokens (mask_it = 1).

    token-mean:               Σ_{i,t} ℓ_it / Σ_i |o_i|
    seq-mean-token-mean:      (1/B') Σ_i (1/|o_i|) Σ_t ℓ_it
    seq-mean-token-sum:       (1/B') Σ_i Σ_t ℓ_it
    seq-mean-token-sum-norm:  Σ_{i,t} ℓ_it / (B · L)      (Dr.GRPO; L = max_response_length, else the longest response)

    |o_i| counts row i's trained tokens, B is the number of rows and B' the number of rows
    with at least one trained token (a fully masked row is not a sequence of the batch). The
    constant normaliser B·L is TRL's `dr_grpo`; verl's `seq-mean-token-sum-norm` divides by
    L only, a constant factor B apart. An empty batch gives 0.

    Σ_i |o_i|, B', B and the default L are `counts`: the whole minibatch's (`inputs.counts`, which
    `minpro train` fills in for every micro-batch and rank), else this batch's own. Only the
    numerators are sums over the rows given here.
    """
    if counts is None:
        counts = _counts_from_context() or MinibatchCounts.of_mask(mask)
    maskf = mask.to(per_token.dtype)
    masked = per_token * maskf
    if mode == "token-mean":
        return masked.sum() / max(counts.tokens, 1)
    if mode == "seq-mean-token-sum-norm":
        length = max_response_length if max_response_length is not None else counts.length
        return masked.sum() / max(counts.rows * length, 1)
    if mode == "seq-mean-token-mean":
        seq_loss = masked.sum(-1) / maskf.sum(-1).clamp(min=1.0)
    elif mode == "seq-mean-token-sum":
        seq_loss = masked.sum(-1)
    else:
        raise ValueError(f"unknown loss_agg {mode!r}")
    return seq_loss.sum() / max(counts.sequences, 1)


def _counts_from_context() -> MinibatchCounts | None:
    counts = _MINIBATCH.get()
    if counts is not None:
        warnings.warn(
            "an objective aggregated without its minibatch counts; pass them explicitly: "
            "self.aggregate(per_token, mask, inputs.counts) (the implicit counts go in the next release)",
            DeprecationWarning,
            stacklevel=4,
        )
    return counts


# Metric helpers return detached 0-d float64 tensors, not floats: `minpro train` reads every
# metric of a step in one transfer instead of one host sync per metric and micro-batch.


def is_scalar_metric(value: object) -> bool:
    """What an objective may put in `ObjectiveOutput.metrics`: a number or a detached 0-d tensor."""
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not value.requires_grad
    return type(value) in (float, int)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the trained tokens (NaN for none)."""
    values = values.detach().double()
    return torch.where(mask, values, 0.0).sum() / mask.sum()


def masked_min(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Smallest value over the trained tokens (NaN for none)."""
    smallest = torch.where(mask, values.detach().double(), math.inf).amin()
    return torch.where(mask.any(), smallest, math.nan)


def masked_fraction(condition: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fraction of the trained tokens where `condition` holds (0 for an empty batch)."""
    return (condition & mask).sum().double() / mask.sum().clamp(min=1)
