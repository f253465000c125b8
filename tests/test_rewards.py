"""Reward functions as TRL and verl users write them (`verifier.name: python`): a TRL-style
file with two weighted functions and a verl-style `compute_score`, each training from a recipe;
every function's reward logged; the row's columns passed through; a function that hangs is
bounded. (One that raises or returns NaN is in the fault table, test_faults.py.)"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from minpro_cli.config import load_recipe
from minpro_cli.errors import ConfigError
from minpro_cli.fileio import read_jsonl
from minpro_cli.rollouts import read_rollouts
from minpro_cli.train import run_train
from minpro_cli.verifiers import verify_batch
from minpro_cli.verifiers.python import PythonRewards

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
TINY = ["train.iterations=1", "train.prompts_per_iteration=4", "train.group_size=2", "sampler.options.max_new_tokens=8",
        "optim.warmup_steps=0"]  # fmt: skip

TRL_REWARDS = '''
def accuracy(prompts, completions, solution, **kwargs):
    """TRL's shape: lists in, one float per completion out; `solution` is a dataset column."""
    return [1.0 if s.strip() and s.strip() in c else 0.0 for c, s in zip(completions, solution)]


def brevity(prompts, completions, completion_ids, difficulty, **kwargs):
    """Negative rewards are fine; `difficulty` is another column of the row."""
    return [-len(ids) / 10.0 * float(d) for ids, d in zip(completion_ids, difficulty)]
'''

VERL_REWARDS = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """verl's custom_reward_function: routed by data_source, a dict with "score"."""
    if data_source == "arith":
        return {"score": 2.0 * (ground_truth in solution_str) + extra_info["bonus"], "acc": 1.0}
    return 0.0
'''


def tasks(tmp_path: Path) -> Path:
    rows = [{"id": f"q{i}", "question": f"{i}+{i}=", "solution": str(2 * i), "difficulty": i + 1,
             "data_source": "arith", "extra_info": {"bonus": i / 10}} for i in range(4)]  # fmt: skip
    (tmp_path / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "tasks.jsonl"


def test_a_trl_style_reward_file_with_two_weighted_functions_trains_and_logs_each(tmp_path):
    (tmp_path / "rewards.py").write_text(TRL_REWARDS)
    rewards = (f"verifier.options={{rewards: [{{path: {tmp_path / 'rewards.py'}, function: accuracy, weight: 1.0}}, "
               f"{{path: {tmp_path / 'rewards.py'}, function: brevity, weight: 0.5}}]}}")
    recipe = load_recipe(QUICKSTART, [f"run_dir={tmp_path / 'run'}", *TINY, f"data.train={tasks(tmp_path)}",
                                      "data.answer_field=solution", "verifier.name=python", rewards])  # fmt: skip
    run_train(recipe)
    rows = read_rollouts(tmp_path / "run" / "rollouts").to_pylist()
    difficulty = {f"q{i}": i + 1 for i in range(4)}
    for row in rows:  # the weighted sum, recomputed here from the response and its tokens
        accuracy = float(row["reference_answer"] in row["response"])
        brevity = -len(row["response_token_ids"]) / 10.0 * difficulty[row["prompt_id"]]
        assert row["reward"] == pytest.approx(accuracy + 0.5 * brevity, abs=1e-6)
        assert json.loads(row["verifier_details"])["rewards"] == pytest.approx({"accuracy": accuracy,
                                                                                "brevity": brevity})  # fmt: skip
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert all({"reward/accuracy", "reward/brevity"} <= m.keys() for m in metrics)
    assert metrics[0]["reward/brevity"] < 0  # outside [0, 1]
    assert (tmp_path / "run" / "final").is_dir()


def test_a_verl_style_compute_score_trains_routed_by_data_source(tmp_path):
    (tmp_path / "reward.py").write_text(VERL_REWARDS)
    recipe = load_recipe(QUICKSTART, [f"run_dir={tmp_path / 'run'}", *TINY, f"data.train={tasks(tmp_path)}",
                                      "data.answer_field=solution", "verifier.name=python",
                                      f"verifier.options={{path: {tmp_path / 'reward.py'}, function: compute_score}}"])
    run_train(recipe)
    for row in read_rollouts(tmp_path / "run" / "rollouts").to_pylist():
        bonus = int(row["prompt_id"][1:]) / 10
        assert row["reward"] == pytest.approx(2.0 * (row["reference_answer"] in row["response"]) + bonus, abs=1e-6)


def test_reward_function_options_are_checked_at_the_recipe(tmp_path):
    (tmp_path / "rewards.py").write_text(TRL_REWARDS)
    base = [f"run_dir={tmp_path / 'run'}", "verifier.name=python"]
    with pytest.raises(ConfigError, match="rewards.py:nope.*no function 'nope'"):
        load_recipe(QUICKSTART, [*base, f"verifier.options={{path: {tmp_path / 'rewards.py'}, function: nope}}"])
    with pytest.raises(ConfigError, match="no file"):
        load_recipe(QUICKSTART, [*base, f"verifier.options={{path: {tmp_path / 'absent.py'}, function: f}}"])
    twice = f"{{path: {tmp_path / 'rewards.py'}, function: accuracy}}"
    with pytest.raises(ConfigError, match="share a name"):
        load_recipe(QUICKSTART, [*base, f"verifier.options={{rewards: [{twice}, {twice}]}}"])


def test_a_reward_function_that_hangs_is_bounded_on_every_call(tmp_path):
    (tmp_path / "slow.py").write_text("import time\ndef slow(prompts, completions, **kw):\n"
                                      "    if completions[0] == 'hang':\n        time.sleep(3600)\n    return [1.0]\n")
    verifier = PythonRewards(path=str(tmp_path / "slow.py"), function="slow", timeout_s=0.5)
    started = time.perf_counter()
    results = verify_batch(verifier, ["hang", "fine"], ["1", "1"], workers=2)
    assert [r.reward for r in results] == [0.0, 1.0]
    assert time.perf_counter() - started < 30
