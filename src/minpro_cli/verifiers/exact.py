"""`exact` verifier: normalised string match."""

from __future__ import annotations

import string
from typing import ClassVar, Literal

from pydantic import Field

from minpro_cli.verifiers import VerifierOptions, VerifyResult
from minpro_cli.verifiers.math import last_boxed

EDGE_PUNCTUATION = string.punctuation.replace("%", "") + " \t\n“”‘’"


def normalise(text: str, case_sensitive: bool) -> str:
    """Collapse whitespace and strip surrounding punctuation and quotes (not inner ones)."""
    text = " ".join(text.split()).strip(EDGE_PUNCTUATION)
    return text if case_sensitive else text.lower()


class ExactVerifier(VerifierOptions):
    """Scores 1 when the answer equals the reference as a normalised string.

    The answer is the whole response, its last non-empty line, or its last \\boxed{}
    (`extract`). Both sides have whitespace collapsed and surrounding punctuation and quotes
    stripped, and are lower-cased unless `case_sensitive`.
    """

    bounded_in_process: ClassVar[bool] = True  # its own checks bound every call

    extract: Literal["full", "last_line", "boxed"] = Field("full", description="which part of the response is the answer")
    case_sensitive: bool = False

    def __call__(self, response: str, reference: str) -> VerifyResult:
        if self.extract == "boxed":
            answer = last_boxed(response, 512)
        elif self.extract == "last_line":
            lines = [line for line in response.splitlines() if line.strip()]
            answer = lines[-1] if lines else None
        else:
            answer = response
        if answer is None:
            return VerifyResult(0.0, {"extracted": None, "failure": f"no answer ({self.extract})"})
        correct = normalise(answer, self.case_sensitive) == normalise(reference, self.case_sensitive)
        shown = answer[-200:]
        return VerifyResult(float(correct), {"extracted": shown} | ({} if correct else {"failure": "not equal"}))
