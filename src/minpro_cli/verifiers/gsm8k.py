"""`gsm8k` verifier: the GSM8K convention (final answer after '####', compared as a number)."""

from __future__ import annotations

import re
from fractions import Fraction
from typing import ClassVar

from minpro_cli.verifiers import VerifierOptions, VerifyResult

MARKER = re.compile(r"####\s*(.*)")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
TAIL = 4000  # only the end of a response is read: bounded work for any input


def final_number(text: str) -> str | None:
    """The number after the last '####' if there is one, else the last number in the text;
    commas, currency signs and units around it are dropped."""
    tail = text[-TAIL:]
    marked = MARKER.findall(tail)
    after_marker = NUMBER.findall(marked[-1]) if marked else []
    if after_marker:
        return after_marker[0].replace(",", "")
    numbers = NUMBER.findall(tail)
    return numbers[-1].replace(",", "") if numbers else None


class GSM8KVerifier(VerifierOptions):
    """Scores 1 when the response's final number equals the reference's (GSM8K convention).

    Reference: the number after '####' (a full GSM8K solution works as is) or the whole
    field. Response: the number after its last '####', else its last number. Both are
    compared as exact decimals: "1,234", "$1234.00" and "1234 apples" are all 1234.
    """

    bounded_in_process: ClassVar[bool] = True  # its own checks bound every call

    def __call__(self, response: str, reference: str) -> VerifyResult:
        gold = final_number(reference)
        if gold is None:
            return VerifyResult(0.0, {"extracted": None, "failure": f"reference {reference[:40]!r} has no number"})
        answer = final_number(response)
        if answer is None:
            return VerifyResult(0.0, {"extracted": None, "failure": "no number in the response"})
        correct = Fraction(answer) == Fraction(gold)
        return VerifyResult(float(correct), {"extracted": answer} | ({} if correct else {"failure": "not equal"}))
