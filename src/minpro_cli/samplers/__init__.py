"""Samplers: generation back ends returning token ids and the log-probs they sampled with.

A sampler plugin is a Pydantic model (its options) with a `generate` method:

    generate(policy, prompts: list[list[int]], seed: int) -> list[Generation]

`Generation.logprobs[t]` is log μ(o_t | …) under the distribution that drew o_t
(temperature and any top-p / top-k truncation applied), one per response token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from minpro_cli.modeling import Policy


@dataclass
class Generation:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: Literal["stop", "length"]


class Sampler(Protocol):
    temperature: float
    top_p: float
    top_k: int

    def generate(self, policy: Policy, prompts: list[list[int]], seed: int) -> list[Generation]: ...
