"""Samplers: generation back ends returning token ids and the log-probs they sampled with.

A sampler plugin is a Pydantic model (its options) with a `generate` method; its sampling
options come from `SamplingParams`, which a sampler extends with its own:

    generate(policy, prompts: list[list[int]], seed: int) -> list[Generation]

`Generation.logprobs[t]` is log μ(o_t | …) under the distribution that drew o_t
(temperature and any top-p / top-k truncation applied), one per response token.

Optional attributes a sampler may declare: `prompts_per_call` (prompts per `generate` call;
None: a whole round), `weights_dtype` (the torch dtype it holds weights in: minpro keeps
the copies it makes only for sampling in that dtype) and `switches_weights` (True: `generate`
takes `switches`, a list of `WeightSwitch`, and continues responses in flight under newer
weights, as `train.partial_rollout` needs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field

from minpro_cli.logprobs import pack, response_logprobs
from minpro_cli.modeling import Policy


@dataclass
class Generation:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: Literal["stop", "length"]


@dataclass(frozen=True)
class WeightSwitch:
    """At response token `at` (0-based) the weights change while responses are in flight:
    `load()` puts the next version's weights into the policy `generate` was given, waiting if
    the trainer has not published them yet (at token 0: the weights each batch starts with). Tokens from `at` on are drawn with them, and the
    prefix is read again under them (the KV cache is rebuilt), so each token's log μ is that of a
    forward pass of the weights that drew it."""

    at: int
    load: Callable[[], None]


class SamplingParams(BaseModel):
    """The options every sampler shares (defaults: plain temperature sampling, no truncation,
    which keeps μ the distribution the ratio needs). `max_new_tokens` is also Dr.GRPO's L."""

    model_config = ConfigDict(extra="forbid")

    # below 1e-3, logits / temperature overflows float32 (and bf16) for ordinary logits
    temperature: float = Field(1.0, ge=1e-3, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    max_new_tokens: int = Field(64, ge=1)
    placement: Literal["inline", "dedicated"] = Field(
        "inline",
        description="inline: `minpro train` samples in its own process; dedicated: a sampler process of its own "
        "samples rounds ahead while the trainer trains (train.staleness rounds, exact, or within "
        "train.max_staleness steps, bounded), weights handed over in shared memory",
    )
    threads: int | None = Field(
        None, ge=1, description="dedicated: the sampler process's CPU threads (OMP_NUM_THREADS); null: torch's default"
    )
    device: str | None = Field(None, description="dedicated: the sampler process's device (e.g. cuda:1); null: model.device")


class Sampler(Protocol):
    temperature: float
    top_p: float
    top_k: int

    def generate(self, policy: Policy, prompts: list[list[int]], seed: int) -> list[Generation]: ...


def policy_logprobs(
    policy: Policy, prompts: list[list[int]], generations: list[Generation], temperature: float = 1.0
) -> list[torch.Tensor]:
    """log π(o_t | …) of each generation's tokens under `policy` at `temperature`, from one full
    forward pass: what a sampler's recorded `logprobs` must equal (untruncated sampling)."""
    packed = pack(prompts, [g.token_ids for g in generations], policy.pad_token_id)
    with torch.no_grad(), policy.autocast():
        recomputed, _ = response_logprobs(policy.model, packed, temperature)
    return [recomputed[i, : len(g.token_ids)].cpu() for i, g in enumerate(generations)]
