"""Reward verifiers: score a response against a reference answer.

A verifier plugin is a Pydantic model (its options) that is callable:

    verifier(response: str, reference: str) -> VerifyResult

It never raises on bad model output: a garbage answer scores 0 with the reason in
`details["failure"]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class VerifyResult:
    reward: float  # in [0, 1]
    details: dict[str, Any] = field(default_factory=dict)


class Verifier(Protocol):
    def __call__(self, response: str, reference: str) -> VerifyResult: ...
