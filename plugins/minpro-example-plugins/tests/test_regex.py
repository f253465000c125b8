"""The regex verifier on hand-written cases, option validation and the conformance checks."""

from __future__ import annotations

import pytest

from minpro_cli.conformance import check_plugin
from minpro_cli.errors import PluginError
from minpro_cli.registry import load_verifier


@pytest.mark.parametrize(
    "response,reference,reward",
    [
        ("so the answer is 42.", "42", 1.0),
        ("The answer is: $1,234", "1234", 1.0),
        ("answer is 1/2", "0.5", 1.0),
        ("answer is 0.50", "1/2", 1.0),
        ("answer is 41. Wait, the answer is 42", "42", 1.0),  # the last match counts
        ("the answer is 42", "43", 0.0),
        ("I don't know", "42", 0.0),
        ("", "42", 0.0),
    ],
)
def test_default_pattern(response, reference, reward):
    assert load_verifier("regex")(response, reference).reward == reward


def test_custom_pattern_and_string_answers():
    verify = load_verifier("regex", pattern=r"####\s*(\w+)")
    assert verify("blah #### Paris", "paris").reward == 1.0
    result = verify("#### Rome", "Paris")
    assert result.reward == 0.0 and result.details == {"extracted": "Rome", "failure": "not equal"}


def test_only_the_tail_is_searched():
    verify = load_verifier("regex", max_chars=20)
    assert verify("answer is 42" + " " * 50, "42").reward == 0.0


@pytest.mark.parametrize("pattern,message", [("(unclosed", "not a valid regular expression"),
                                             (r"answer is \d+", "capturing group")])
def test_bad_patterns_are_named(pattern, message):
    with pytest.raises(PluginError, match=message):
        load_verifier("regex", pattern=pattern)


def test_passes_minpro_conformance_checks():
    results = check_plugin("verifiers", "regex", {}, policy=lambda: None)
    assert all(r.passed for r in results), [r for r in results if not r.passed]
