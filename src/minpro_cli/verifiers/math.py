"""`math` verifier: the last \\boxed{} answer, compared with the reference as mathematics.

Extraction is ours (a brace-matching scan, bounded in length) so that a hostile response
cannot feed an unbounded string to the parser; comparison is math-verify's, bounded by its
own timeout (`signal.alarm`, which works in the main thread of a process).
"""

from __future__ import annotations

import logging
import re
from fractions import Fraction
from typing import ClassVar, Literal

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from pydantic import Field

from minpro_cli.verifiers import VerifierOptions, VerifyResult

BOXED = "\\boxed{"
PLAIN_NUMBER = re.compile(r"-?\d+(\.\d+)?")
ANSWER_IS = re.compile(r"answer is:?\s*\$?([^\n$]{1,200}?)\$?\s*(?:\.\s|\.?$|\n)", re.IGNORECASE)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
FALLBACK_TAIL = 2000  # the fallbacks read only the end of a response: bounded work
# math-verify logs (not raises) its timeouts; the failure reason is in the result instead
logging.getLogger("math_verify").setLevel(logging.CRITICAL)


def last_boxed(text: str, max_chars: int) -> str | None:
    """Content of the last \\boxed{...}, or None if it is unclosed or longer than max_chars.

    Only the last one counts: it is the final answer, and scanning a single candidate keeps
    the cost linear in max_chars whatever the response holds.
    """
    start = text.rfind(BOXED)
    if start == -1:
        return None
    depth, begin = 1, start + len(BOXED)
    for i in range(begin, min(len(text), begin + max_chars + 1)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
    return None


def fallback_answer(text: str, mode: str) -> str | None:
    """'answer_is': the last "the answer is X"; 'last_number' also tries the last number."""
    tail = text[-FALLBACK_TAIL:]
    found = ANSWER_IS.findall(tail)
    if found:
        return found[-1].strip()
    if mode == "last_number":
        numbers = NUMBER.findall(tail)
        return numbers[-1].replace(",", "") if numbers else None
    return None


class MathVerifier(VerifierOptions):
    r"""Scores the last \boxed{} answer: exact for plain numbers, math-verify otherwise.

    The fields are the `math` verifier's options. With `fallback`, a response without a boxed
    answer is read for "the answer is X" (`answer_is`) and then for its last number
    (`last_number`); the default scores only boxed answers, which is what RL rewards want.
    """

    bounded_in_process: ClassVar[bool] = True  # its own checks bound every call

    timeout_s: int = Field(5, ge=1, description="bound on parsing and on comparing, each")
    max_answer_chars: int = Field(512, ge=1, description="longer boxed answers score 0")
    fallback: Literal["none", "answer_is", "last_number"] = Field("none", description="when there is no \\boxed{}")

    def __call__(self, response: str, reference: str) -> VerifyResult:
        answer = last_boxed(response, self.max_answer_chars)
        if answer is None and self.fallback != "none":
            answer = fallback_answer(response, self.fallback)
        if answer is None:
            wanted = "\\boxed{}" if self.fallback == "none" else "\\boxed{}, 'the answer is' or number"
            return VerifyResult(0.0, {"extracted": None, "failure": f"no {wanted} answer"})
        try:
            correct = self._equal(answer.strip(), reference.strip())
        except _Unparsable as exc:
            return VerifyResult(0.0, {"extracted": answer, "failure": str(exc)})
        except Exception as exc:  # noqa: BLE001 — math-verify raises many types; a bad answer must never stop a run
            return VerifyResult(0.0, {"extracted": answer, "failure": f"verifier error: {type(exc).__name__}"})
        details = {"extracted": answer} | ({} if correct else {"failure": "not equal to reference"})
        return VerifyResult(1.0 if correct else 0.0, details)

    def reference_response(self, reference: str) -> str:
        return f"The answer is \\boxed{{{reference}}}."

    def _equal(self, answer: str, reference: str) -> bool:
        if len(answer) > self.max_answer_chars:
            raise _Unparsable(f"answer longer than {self.max_answer_chars} characters")
        if PLAIN_NUMBER.fullmatch(answer) and PLAIN_NUMBER.fullmatch(reference):
            # exact rational comparison: math-verify's verdict without sympy's ~40 ms per call
            return Fraction(answer) == Fraction(reference)
        predicted = parse(
            f"\\boxed{{{answer}}}", extraction_config=[LatexExtractionConfig()], parsing_timeout=self.timeout_s
        )
        if not predicted:
            raise _Unparsable("answer does not parse as math (or parsing timed out)")
        gold = parse(
            reference if BOXED in reference else f"${reference}$",
            extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
            parsing_timeout=self.timeout_s,
        )
        if not gold:
            raise _Unparsable("reference does not parse as math")
        return bool(verify(gold, predicted, timeout_seconds=self.timeout_s))


class _Unparsable(Exception):
    pass
