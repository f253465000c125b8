"""`minpro probe`'s results: one draw's numbers, their mean ± standard error over draws, and
the JSON records `minpro probe --json` writes and `minpro report --probe` reads back."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class DrawResult:
    cosine: float
    norm_ratio: float
    floor_cosine: float
    floor_norm_ratio: float
    reference_error: float  # ε★
    kl: float  # KL(μ‖π) per token of μ's sample


@dataclass
class Summary:
    """Mean and standard error of one quantity over the draws (s.e. NaN for one draw)."""

    draws: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return sum(self.draws) / len(self.draws) if self.draws else math.nan

    @property
    def se(self) -> float:  # a NaN draw (a gradient of 0: every reward equal) makes both NaN
        n, mean = len(self.draws), self.mean
        return math.sqrt(sum((x - mean) ** 2 for x in self.draws) / (n - 1) / n) if n > 1 else math.nan

    def as_json(self) -> dict[str, Any]:
        return {"mean": self.mean, "se": self.se, "draws": self.draws}


QUANTITIES = ("cosine", "norm_ratio", "floor_cosine", "floor_norm_ratio", "reference_error", "kl")


@dataclass
class Cell:
    """One behaviour policy × one objective over all draws."""

    behavior: str
    staleness: int | None  # optimizer steps between μ and π, when known
    objective: str
    summaries: dict[str, Summary] = field(default_factory=lambda: {q: Summary() for q in QUANTITIES})
    switch_at: int | None = None  # the behaviour's responses switched to π's weights at this token

    def add(self, result: DrawResult) -> None:
        for q in QUANTITIES:
            self.summaries[q].draws.append(getattr(result, q))

    def as_json(self) -> dict[str, Any]:
        return {"behavior": self.behavior, "staleness": self.staleness, "switch_at": self.switch_at,
                "objective": self.objective, **{q: s.as_json() for q, s in self.summaries.items()}}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Cell:
        summaries = {q: Summary([float(x) for x in data[q]["draws"]]) for q in QUANTITIES}
        return cls(str(data["behavior"]), data.get("staleness"), str(data["objective"]), summaries, data.get("switch_at"))
