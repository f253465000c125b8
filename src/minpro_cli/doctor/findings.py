"""What a check reports: a verdict, the number it measured, the threshold it held it to, and
one line on what to do. The verdicts decide `minpro doctor`'s exit code."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Verdict = Literal["ok", "warn", "fail"]
SEVERITY: dict[Verdict, int] = {"ok": 0, "warn": 1, "fail": 2}
COLOURS_TEXT: dict[Verdict, str] = {"ok": "green", "warn": "yellow", "fail": "bold red"}  # the terminal table


@dataclass(frozen=True)
class Finding:
    key: str  # stable: the JSON report's `checks[].key` (docs/doctor.md)
    title: str
    verdict: Verdict
    value: float | None  # the measured number the verdict rests on
    threshold: str  # what `value` was held to, in words
    advice: str  # one line: what to do (or why nothing needs doing)
    details: dict[str, Any] = field(default_factory=dict)


def graded(value: float, warn_above: float, fail_above: float) -> Verdict:
    """ok up to `warn_above`, warn up to `fail_above`, fail beyond (NaN fails)."""
    if not value <= fail_above:
        return "fail"
    return "warn" if value > warn_above else "ok"


def worst(findings: list[Finding]) -> Verdict:
    return max((f.verdict for f in findings), key=SEVERITY.__getitem__, default="ok")


def exit_code(findings: list[Finding], strict: bool) -> int:
    """0 every check ok, 1 a warning, 2 a failure (a warning too with `strict`)."""
    code = SEVERITY[worst(findings)]
    return 2 if strict and code == 1 else code
