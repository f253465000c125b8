"""The long-chain task and the `embedded:chain` model shipped for off-policy studies."""

from __future__ import annotations

import re
from pathlib import Path

from minpro_cli.config import load_recipe
from minpro_cli.modeling import load_policy
from minpro_cli.sampling import Plugins, sample_rows, sampling_job
from minpro_cli.tasks import load_problems

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "offpolicy-sweep.yaml"


def test_chain_answers_are_the_left_to_right_value_and_the_splits_are_disjoint():
    splits = {name: load_problems(f"embedded:arith-chain-{name}", "question", "answer", "id")
              for name in ("train", "test")}
    assert (len(splits["train"]), len(splits["test"])) == (2000, 500)
    assert not {p.question for p in splits["train"]} & {p.question for p in splits["test"]}
    for problem in splits["train"] + splits["test"]:
        start, *terms = re.findall(r"[+-]?\d+", problem.question.removeprefix("Compute ").removesuffix("."))
        assert 11 <= len(terms) <= 13 and all(1 <= abs(int(t)) <= 9 for t in terms)
        value = int(start)
        for term in terms:
            value += int(term)
            assert 0 <= value <= 99  # the chains never need a minus sign
        assert problem.answer == str(value)


def test_chain_model_writes_long_solutions_and_solves_some():
    recipe = load_recipe(RECIPE, ["model.path=embedded:chain", "sampler.options.max_new_tokens=256"])
    policy = load_policy("embedded:chain")
    problems = load_problems("embedded:arith-chain-test", "question", "answer", "id")[:24]
    rows, _ = sample_rows(sampling_job(recipe, policy, Plugins.of(recipe)), problems, 2, seed=0)
    finished = [r for r in rows if r.finish_reason == "stop"]
    assert len(finished) >= 40  # 48 responses: nearly all end with eos within 256 tokens
    assert min(len(r.response_token_ids) for r in finished) >= 150
    solved = [r for r in rows if r.reward == 1.0]
    assert 1 <= len(solved) <= 24  # a minority: RL has room to improve
    for r in solved:
        assert r.response.rstrip().endswith(f"\\boxed{{{r.reference_answer}}}")
