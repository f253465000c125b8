"""Hand-written (response, reference, expected) cases for the math, gsm8k and exact verifiers,
and the parallel batch path (results in order, hostile input still bounded; calls that hang,
raise or kill their worker cost that call, never the batch or the next one)."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest

from minpro_cli import verifiers
from minpro_cli.registry import load_verifier
from minpro_cli.verifiers import VerifierCallError, VerifyResult, verify_batch, workers
from minpro_cli.verifiers.math import MathVerifier

MATH_CASES = [
    # fractions, decimals, integers
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "0.75", 1.0),
    ("\\boxed{\\tfrac{2}{4}}", "1/2", 1.0),
    ("\\boxed{6/8}", "3/4", 1.0),
    ("\\boxed{-0.25}", "-\\frac{1}{4}", 1.0),
    ("\\boxed{007}", "7", 1.0),
    ("\\boxed{3.000}", "3", 1.0),
    ("\\boxed{1,000}", "1000", 1.0),
    # LaTeX versus plain
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}", 1.0),
    ("\\boxed{2\\sqrt{3}}", "\\sqrt{12}", 1.0),
    ("\\boxed{\\pi}", "\\pi", 1.0),
    ("\\boxed{2\\pi}", "\\pi \\cdot 2", 1.0),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
    ("\\boxed{\\frac{x}{2}}", "x/2", 1.0),
    ("\\boxed{e^{0}}", "1", 1.0),
    # percentages
    ("\\boxed{50\\%}", "50", 1.0),
    ("\\boxed{25\\%}", "25\\%", 1.0),
    # sets, intervals, tuples
    ("\\boxed{\\{1, 2, 3\\}}", "\\{3, 2, 1\\}", 1.0),
    ("\\boxed{(1, 2)}", "(1,2)", 1.0),
    ("\\boxed{[0, 1)}", "[0,1)", 1.0),
    ("\\boxed{(2, 1)}", "(1, 2)", 0.0),
    ("\\boxed{[0, 1]}", "[0, 1)", 0.0),
    # equations and text around the answer
    ("\\boxed{x = 5}", "5", 1.0),
    ("\\boxed{\\text{5}}", "5", 1.0),
    ("Thus the final answer is $\\boxed{42}$. I hope it is correct.", "42", 1.0),
    # wrong answers that look similar
    ("\\boxed{0.51}", "0.5", 0.0),
    ("\\boxed{\\frac{1}{3}}", "0.33", 0.0),
    ("\\boxed{-7}", "7", 0.0),
    ("\\boxed{12}", "21", 0.0),
    ("\\boxed{\\sqrt{3}}", "\\sqrt{2}", 0.0),
    ("\\boxed{x^2-1}", "(x+1)^2", 0.0),
    ("\\boxed{3\\pi}", "\\pi", 0.0),
    ("\\boxed{100}", "1000", 0.0),
    # multiple boxed answers: the last one is the answer
    ("\\boxed{3} no, wait: \\boxed{4}", "4", 1.0),
    ("\\boxed{4} no, wait: \\boxed{3}", "4", 0.0),
    ("\\boxed{\\boxed{5}}", "5", 1.0),
    # no answer or broken answer
    ("I am not sure.", "4", 0.0),
    ("", "4", 0.0),
    ("\\boxed{}", "4", 0.0),
    ("\\boxed{4", "4", 0.0),
    ("the answer is 4", "4", 0.0),  # no fallback by default: RL rewards want the format
    ("\\boxed{@#$%}", "4", 0.0),
]


@pytest.mark.parametrize("response,reference,expected", MATH_CASES)
def test_math_verifier_case(response, reference, expected):
    result = MathVerifier()(response, reference)
    assert result.reward == expected, result.details
    assert (expected == 1.0) == ("failure" not in result.details)


def test_enough_hand_written_math_cases():
    assert len(MATH_CASES) >= 40


@pytest.mark.parametrize(
    "response,reference,expected,fallback",
    [
        ("So the answer is 12.", "12", 1.0, "answer_is"),
        ("The answer is: $\\frac{1}{2}$.", "0.5", 1.0, "answer_is"),
        ("we get 3, then finally 4", "4", 0.0, "answer_is"),
        ("we get 3, then finally 4", "4", 1.0, "last_number"),
        ("total: 1,250 dollars", "1250", 1.0, "last_number"),
        ("the answer is 7. Check: 3 + 4 = 7", "7", 1.0, "last_number"),
        ("\\boxed{5} and the answer is 6", "5", 1.0, "last_number"),  # boxed still wins
        ("no numbers at all", "4", 0.0, "last_number"),
    ],
)
def test_math_fallbacks(response, reference, expected, fallback):
    assert MathVerifier(fallback=fallback)(response, reference).reward == expected


@pytest.mark.parametrize(
    "response,reference,expected",
    [
        ("She has 3 + 4 = 7 apples.\n#### 7", "Natalia sold 48/2 = 24 clips.\n#### 72", 0.0),
        ("48 + 24 = 72 clips in total.\n#### 72", "Natalia sold 48/2 = 24 clips.\n#### 72", 1.0),
        ("The total is $1,234.", "1234", 1.0),
        ("It costs 1234.00 dollars", "#### 1,234", 1.0),
        ("so 18 eggs a day, 16 - 3 - 4 = 9, 9 * 2 = 18", "18", 1.0),
        ("#### 18 (because 9 * 2)", "18", 1.0),  # the number after #### wins over later ones
        ("-5 degrees", "-5", 1.0),
        ("0.5", ".5", 1.0),
        ("I cannot solve this.", "18", 0.0),
        ("The answer is 17.", "18", 0.0),
    ],
)
def test_gsm8k_verifier(response, reference, expected):
    assert load_verifier("gsm8k")(response, reference).reward == expected


def test_gsm8k_reference_without_a_number_is_a_clear_zero():
    result = load_verifier("gsm8k")("#### 3", "three")
    assert result.reward == 0.0 and "has no number" in result.details["failure"]


@pytest.mark.parametrize(
    "response,reference,options,expected",
    [
        ("Paris", "paris", {}, 1.0),
        ("  Paris.  ", "Paris", {}, 1.0),
        ('"New   York"', "new york", {}, 1.0),
        ("Paris", "paris", {"case_sensitive": True}, 0.0),
        ("Let me think.\nParis\n", "Paris", {"extract": "last_line"}, 1.0),
        ("Let me think.\nParis\n", "Paris", {}, 0.0),
        ("so \\boxed{B}", "b", {"extract": "boxed"}, 1.0),
        ("no box", "b", {"extract": "boxed"}, 0.0),
        ("Rome", "Paris", {}, 0.0),
    ],
)
def test_exact_verifier(response, reference, options, expected):
    assert load_verifier("exact", **options)(response, reference).reward == expected


def test_batch_keeps_order_and_matches_single_calls():
    verify = MathVerifier()
    responses = [f"\\boxed{{{i % 7}}}" for i in range(150)] + [r for r, _, _ in MATH_CASES]
    references = [str(i % 5) for i in range(150)] + [ref for _, ref, _ in MATH_CASES]
    parallel = verify_batch(verify, responses, references, workers=2, probe=0)  # probe=0: all in workers
    serial = [verify(r, a) for r, a in zip(responses, references)]
    assert [p.reward for p in parallel] == [s.reward for s in serial]
    assert [p.details for p in parallel] == [s.details for s in serial]


def test_batch_bounds_a_hostile_input_in_worker_processes():
    """math-verify's own timeout uses signal.alarm, which only works in a main thread: the batch
    path runs each call in the main thread of a worker process, so it still applies there."""
    verify = MathVerifier(timeout_s=1)
    hostile = "\\boxed{" + "9^{9^{9^{9}}}" + "}"
    responses = [hostile] * 4 + ["\\boxed{3}"] * 80
    started = time.perf_counter()
    results = verify_batch(verify, responses, ["3"] * len(responses), workers=2, probe=0)
    took = time.perf_counter() - started
    assert [r.reward for r in results] == [0.0] * 4 + [1.0] * 80
    assert took < 4 * (2 * 1 + 5), f"batch took {took:.1f} s"
    assert load_verifier("math").batch(["\\boxed{1}"], ["1"])[0].reward == 1.0


def test_cheap_calls_stay_in_process():
    """A verifier that answers in microseconds is not worth other processes: no pool is started."""
    verifiers._discard_pool()
    results = verify_batch(MathVerifier(), ["\\boxed{2}"] * 500, ["2"] * 500, workers=2)
    assert all(r.reward == 1.0 for r in results) and verifiers._pool is None


class Scripted:
    """A plugin verifier (runs in workers) whose response says what its call does."""

    timeout_s = 0.5  # a call's bound: 2 · 0.5 + 5 = 6 s

    def __call__(self, response: str, reference: str) -> VerifyResult:
        action, _, seconds = response.partition(":")
        time.sleep(float(seconds or 0))
        if action == "raise":
            raise ValueError(f"the plugin's bug on {reference}")
        if action == "die":
            os._exit(3)
        return VerifyResult(1.0, {"pid": os.getpid()})


SCRIPTED = Scripted()  # one verifier: the pool is kept while the verifier stays


def scripted(responses: list[str]) -> list[VerifyResult]:
    return verify_batch(SCRIPTED, responses, [str(i) for i in range(len(responses))], workers=2)


def test_a_call_that_hangs_or_kills_its_worker_costs_that_call_only():
    verifiers._discard_pool()
    results = scripted(["ok"] * 3 + ["ok:60", "die", "ok"] + ["ok"] * 3)
    assert [r.reward for r in results] == [1, 1, 1, 0, 0, 1, 1, 1, 1]
    assert results[3].details["failure"] == "verifier timed out after 6 s"
    assert results[4].details["failure"] == "verifier worker process died (exit code 3)"
    assert verifiers._pool is not None and len(set(verifiers._pool.pids())) == 2  # replaced, not shrunk


def test_a_call_that_raises_names_the_lowest_raising_item_and_keeps_the_workers():
    """Items 2 and 3 raise, 3 first: the error waits for 2, which is the one named."""
    verifiers._discard_pool()
    assert [r.reward for r in scripted(["ok", "ok"])] == [1, 1]
    assert verifiers._pool is not None
    pids = verifiers._pool.pids()
    with pytest.raises(VerifierCallError, match="raised ValueError: the plugin's bug on 2") as raised:
        scripted(["ok", "ok", "raise:0.5", "raise", "ok", "ok"])
    assert raised.value.index == 2
    assert verifiers._pool.pids() == pids  # neither call that raised cost its worker


def test_a_new_instance_of_the_same_verifier_reuses_the_workers():
    """A stage that builds its verifier per batch (the probe does) must not restart the pool
    each time: each call carries its verifier."""
    verifiers._discard_pool()
    scripted(["ok", "ok"])
    assert verifiers._pool is not None
    pids = verifiers._pool.pids()
    assert [r.reward for r in verify_batch(Scripted(), ["ok"] * 3, ["1"] * 3, workers=2)] == [1, 1, 1]
    assert verifiers._pool.pids() == pids


def test_a_worker_whose_parent_is_gone_ends_without_a_word(capfd):
    """A parent that exits without killing its workers (os._exit, a crash): a worker finds its
    pipe broken and ends; a traceback on the shared stderr would break the CLI's one error line."""
    parent, child = multiprocessing.Pipe()
    parent.send((len, None))
    parent.close()
    workers._serve(child)  # its "ready" finds no reader
    assert capfd.readouterr().err == ""


def test_batches_whose_calls_raise_never_hang():
    """multiprocessing.Pool.terminate() after a raising call hung about one time in twenty
    (a worker killed while it held the shared result pipe's lock)."""
    for _ in range(20):
        started = time.perf_counter()
        with pytest.raises(VerifierCallError):
            scripted(["ok", "raise", "ok", "raise"])
        assert time.perf_counter() - started < 60
