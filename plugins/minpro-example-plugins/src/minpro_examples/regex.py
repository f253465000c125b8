"""A verifier that extracts the answer with a regular expression."""

from __future__ import annotations

import re
from fractions import Fraction

from pydantic import BaseModel, ConfigDict, Field, field_validator

from minpro_cli.verifiers import VerifyResult


class RegexVerifier(BaseModel):
    """Scores 1 when the last match of a regular expression equals the reference answer.

    The answer is the pattern's first group in its last match within the final `max_chars`
    characters of the response (reading only the tail bounds the time of any call). The
    answer and the reference are compared as exact numbers when both parse (1/2 = 0.5 =
    "0.50", commas dropped), otherwise as whitespace-normalised strings.
    """

    model_config = ConfigDict(extra="forbid")

    pattern: str = Field(r"answer is:?\s*\$?([-+]?[\d,]*\.?\d+(?:/\d+)?)", description="regex with one group")
    ignore_case: bool = True
    max_chars: int = Field(4000, ge=1, description="only the last max_chars characters are searched")

    @field_validator("pattern")
    @classmethod
    def _one_group(cls, value: str) -> str:
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        if compiled.groups < 1:
            raise ValueError("the pattern needs a capturing group around the answer")
        return value

    def __call__(self, response: str, reference: str) -> VerifyResult:
        flags = re.IGNORECASE if self.ignore_case else 0
        matches = list(re.finditer(self.pattern, response[-self.max_chars :], flags))
        if not matches:
            return VerifyResult(0.0, {"extracted": None, "failure": "no match for the answer pattern"})
        answer = matches[-1].group(1)
        correct = _same(answer, reference)
        return VerifyResult(float(correct), {"extracted": answer} | ({} if correct else {"failure": "not equal"}))


def _number(text: str) -> Fraction | None:
    try:
        return Fraction(text.strip().replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def _same(answer: str, reference: str) -> bool:
    a, b = _number(answer), _number(reference)
    if a is not None and b is not None:
        return a == b
    return " ".join(answer.split()).lower() == " ".join(reference.split()).lower()
