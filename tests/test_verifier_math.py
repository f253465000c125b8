"""The math verifier: equivalence as mathematics, failure reasons, bounded time."""

from __future__ import annotations

import time

import pytest

from minpro_cli.registry import load_verifier
from minpro_cli.verifiers.math import MathVerifier, last_boxed


@pytest.mark.parametrize(
    "response,reference",
    [
        ("so \\boxed{\\frac{1}{2}}", "0.5"),
        ("\\boxed{0.5}", "1/2"),
        ("\\boxed{1/2}", "\\frac{1}{2}"),
        ("steps... \\boxed{-17}", "-17"),
        ("\\boxed{2.50}", "2.5"),
        ("\\boxed{\\sqrt{4}}", "2"),
    ],
)
def test_equal_answers_score_one(response, reference):
    assert MathVerifier()(response, reference).reward == 1.0


@pytest.mark.parametrize(
    "response,failure",
    [
        ("no answer here", "no \\boxed{} answer"),
        ("\\boxed{19}", "not equal to reference"),
        ("\\boxed{unclosed", "no \\boxed{} answer"),
    ],
)
def test_wrong_or_garbage_answers_score_zero_with_a_reason(response, failure):
    result = MathVerifier()(response, "20")
    assert result.reward == 0.0
    assert result.details["failure"] == failure


def test_last_boxed_answer_wins():
    assert last_boxed("\\boxed{1} then \\boxed{{2}}", 100) == "{2}"
    assert MathVerifier()("\\boxed{3} no wait \\boxed{20}", "20").reward == 1.0


@pytest.mark.parametrize(
    "hostile",
    [
        "\\boxed{" * 200_000,
        "\\boxed{" + "{" * 200_000 + "}" * 200_000 + "}",
        "\\boxed{1}" * 100_000 + "\\boxed{" + "1+" * 100_000 + "1}",
    ],
)
def test_hostile_input_is_bounded(hostile):
    started = time.perf_counter()
    result = MathVerifier(max_answer_chars=512)(hostile, "1")
    assert result.reward == 0.0
    assert result.details["failure"] == "no \\boxed{} answer"
    assert time.perf_counter() - started < 2.0


def test_expensive_expression_stays_within_timeout():
    started = time.perf_counter()
    result = MathVerifier(timeout_s=1)("\\boxed{" + "9^{9^{9^{9}}}" + "}", "3")
    assert result.reward == 0.0
    assert time.perf_counter() - started < 4.0


def test_registry_loads_math_verifier_with_options():
    verify = load_verifier("math", timeout_s=3)
    assert verify("\\boxed{4}", "4").reward == 1.0
