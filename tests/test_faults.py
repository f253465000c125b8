"""Bad input through the real CLI, one process per case: exit code 2, one line naming the
culprit, no traceback, and nothing left at the run's final paths (or, for the inputs that are
not errors, the documented outcome).

Each case builds its input in its own directory from two shared, in-process fixtures (a
rollout file and a finished 2-round run) and runs the CLI there: in a process forked from a
server that imported it once (`cli_forkserver.py`), or `python -m minpro_cli` for the tests
that need their own interpreter.
"""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import queue
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_forkserver import ForkServer
from safetensors.torch import load_file, save_file

from minpro_cli.config import load_recipe
from minpro_cli.rollout import run_rollout
from minpro_cli.rollouts import read_rollouts, write_rollouts
from minpro_cli.rundir import LOCK, MARKER
from minpro_cli.train import run_train

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
TINY = [
    "rollout.num_prompts=4", "rollout.group_size=2", "sampler.options.max_new_tokens=16",
    "train.prompts_per_iteration=2", "train.group_size=2", "train.checkpoint_every=1", "optim.warmup_steps=0",
    "eval.max_problems=2", "eval.n_samples=1", "eval.k=[1]",
]  # fmt: skip
CANARY = "pwned"  # a file the malicious pickles below would create


@dataclass(frozen=True)
class Inputs:
    rollouts: Path  # a valid rollout file of the embedded model
    run: Path  # a finished run: checkpoints/round_00001, round_00002, final/


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    base = tmp_path_factory.mktemp("inputs")
    rollouts = run_rollout(load_recipe(QUICKSTART, [f"run_dir={base / 'sampled'}", *TINY]))
    run = base / "run"
    run_train(load_recipe(QUICKSTART, [f"run_dir={run}", *TINY, "train.iterations=2"]))
    return Inputs(rollouts, run)


CLI_ENV = os.environ | {"HF_HUB_OFFLINE": "1", "COLUMNS": "300"}  # rich must not wrap the error line


def minpro(cwd: Path, *args: str, timeout: float = 300, preexec: Callable[[], None] | None = None):
    return subprocess.run(
        [sys.executable, "-m", "minpro_cli", *args], cwd=cwd, env=CLI_ENV, capture_output=True, text=True,
        timeout=timeout, preexec_fn=preexec, check=False,
    )  # fmt: skip


def train(recipe: Path | str, run_dir: Path, *overrides: str) -> list[str]:
    return ["train", str(recipe), f"run_dir={run_dir}", *TINY, *overrides]


def with_rows(inputs: Inputs, path: Path, change: Callable[[list[dict]], list[dict]]) -> Path:
    """A copy of the fixture's rollout file with its rows changed (metadata kept: minpro's own writer)."""
    write_rollouts(path, change(read_rollouts(inputs.rollouts).to_pylist()), {})
    return path


def set_in_row(row: int, column: str, index: int, value) -> Callable[[list[dict]], list[dict]]:
    def change(rows: list[dict]) -> list[dict]:
        rows[row][column] = [*rows[row][column][:index], value, *rows[row][column][index + 1 :]]
        return rows

    return change


def copy_run(inputs: Inputs, tmp: Path) -> Path:
    run = tmp / "run"
    shutil.copytree(inputs.run, run, symlinks=True)
    return run


def malicious_pickle(tmp: Path) -> bytes:
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp / CANARY}",))

    return pickle.dumps(Payload())


# ---- the cases: each returns the CLI arguments, run in `tmp` -------------------------------------


def binary_recipe(tmp: Path, inputs: Inputs) -> list[str]:
    (tmp / "r.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    return train(tmp / "r.yaml", tmp / "out")


def empty_recipe(tmp: Path, inputs: Inputs) -> list[str]:
    (tmp / "r.yaml").write_text("")
    return ["train", str(tmp / "r.yaml")]


def comments_only_recipe(tmp: Path, inputs: Inputs) -> list[str]:
    (tmp / "r.yaml").write_text("# run_dir: runs/x\n# train:\n#   iterations: 3\n")
    return ["rollout", str(tmp / "r.yaml")]


def recipe_not_a_mapping(tmp: Path, inputs: Inputs) -> list[str]:
    (tmp / "r.yaml").write_text("- train\n- eval\n")
    return ["train", str(tmp / "r.yaml")]


def alias_bomb(tmp: Path, inputs: Inputs) -> list[str]:
    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i, name in enumerate("bcdefghi"):
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{'abcdefghi'[i]}"] * 10) + "]")
    (tmp / "r.yaml").write_text("sweep:\n  grid:\n" + "".join(f"    {line}\n" for line in levels))
    return ["sweep", str(tmp / "r.yaml"), "--out", str(tmp / "out")]


def huge_recipe(tmp: Path, inputs: Inputs) -> list[str]:
    (tmp / "r.yaml").write_text("# " + "x" * (2 << 20) + "\nrun_dir: out\n")
    return ["train", str(tmp / "r.yaml")]


def unknown_key(tmp: Path, inputs: Inputs) -> list[str]:
    return train(QUICKSTART, tmp / "out", "train.iteratons=3")


def missing_recipe(tmp: Path, inputs: Inputs) -> list[str]:
    return ["train", str(tmp / "nope.yaml")]


def nan_logprob(tmp: Path, inputs: Inputs) -> list[str]:
    bad = with_rows(inputs, tmp / "bad.parquet", set_in_row(3, "behavior_logprobs", 1, float("nan")))
    return train(QUICKSTART, tmp / "out", f"train.rollouts={bad}")


def infinite_logprob(tmp: Path, inputs: Inputs) -> list[str]:
    bad = with_rows(inputs, tmp / "bad.parquet", set_in_row(2, "behavior_logprobs", 0, float("-inf")))
    return ["inspect-ratios", str(bad), "--policy", "embedded"]


def positive_logprob(tmp: Path, inputs: Inputs) -> list[str]:
    bad = with_rows(inputs, tmp / "bad.parquet", set_in_row(5, "behavior_logprobs", 0, 0.5))
    return train(QUICKSTART, tmp / "out", f"train.rollouts={bad}")


def zero_rows_train(tmp: Path, inputs: Inputs) -> list[str]:
    empty = with_rows(inputs, tmp / "empty.parquet", lambda rows: [])
    return train(QUICKSTART, tmp / "out", f"train.rollouts={empty}")


def zero_rows_inspect(tmp: Path, inputs: Inputs) -> list[str]:
    with_rows(inputs, tmp / "empty.parquet", lambda rows: [])
    return ["inspect-ratios", str(tmp / "empty.parquet")]


def response_id_outside_vocabulary(tmp: Path, inputs: Inputs) -> list[str]:
    bad = with_rows(inputs, tmp / "bad.parquet", set_in_row(4, "response_token_ids", 0, 10**6))
    return train(QUICKSTART, tmp / "out", f"train.rollouts={bad}")


def prompt_id_outside_vocabulary(tmp: Path, inputs: Inputs) -> list[str]:
    bad = with_rows(inputs, tmp / "bad.parquet", set_in_row(1, "prompt_token_ids", 0, -5))
    return ["inspect-ratios", str(bad), "--policy", "embedded"]


def corrupt_parquet(tmp: Path, inputs: Inputs) -> list[str]:
    data = inputs.rollouts.read_bytes()
    (tmp / "cut.parquet").write_bytes(data[: len(data) // 2])
    return train(QUICKSTART, tmp / "out", f"train.rollouts={tmp / 'cut.parquet'}")


def foreign_parquet(tmp: Path, inputs: Inputs) -> list[str]:
    pq.write_table(pa.table({"a": [1]}), tmp / "foreign.parquet")
    return ["inspect-ratios", str(tmp / "foreign.parquet")]


def truncated_weights_eval(tmp: Path, inputs: Inputs) -> list[str]:
    ckpt = copy_run(inputs, tmp) / "final"
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    return ["eval", str(QUICKSTART), f"run_dir={tmp / 'out'}", *TINY, "--policy", str(ckpt)]


def truncated_weights_resume(tmp: Path, inputs: Inputs) -> list[str]:
    run = copy_run(inputs, tmp)
    weights = run / "checkpoints" / "round_00002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    return train(QUICKSTART, run, "train.iterations=3")


def truncated_optimizer_resume(tmp: Path, inputs: Inputs) -> list[str]:
    run = copy_run(inputs, tmp)
    (shard,) = (run / "checkpoints" / "round_00002" / "dcp").glob("*.safetensors")
    shard.write_bytes(shard.read_bytes()[:3000])
    return train(QUICKSTART, run, "train.iterations=3")


def pickled_checkpoint_format(tmp: Path, inputs: Inputs) -> list[str]:
    """A checkpoint in torch's default DCP format (pickled .metadata): refused, never unpickled."""
    run = copy_run(inputs, tmp)
    dcp = run / "checkpoints" / "round_00002" / "dcp"
    shutil.rmtree(dcp)
    dcp.mkdir()
    (dcp / ".metadata").write_bytes(malicious_pickle(tmp))
    (dcp / "__0_0.distcp").write_bytes(malicious_pickle(tmp))
    (run / "checkpoints" / "round_00002" / "optimizer_param_groups.json").unlink()
    return train(QUICKSTART, run, "train.iterations=3")


def lone_surrogate_answer(tmp: Path, inputs: Inputs) -> list[str]:
    (tmp / "tasks.jsonl").write_text('{"id": "a", "question": "1+1", "answer": "2\\ud800"}\n')
    return ["rollout", str(QUICKSTART), f"run_dir={tmp / 'out'}", *TINY, f"data.train={tmp / 'tasks.jsonl'}"]


def non_utf8_task_file(tmp: Path, inputs: Inputs) -> list[str]:
    (tmp / "tasks.jsonl").write_bytes(b'{"id": "a", "question": "caf\xe9", "answer": "1"}\n')
    return ["eval", str(QUICKSTART), f"run_dir={tmp / 'out'}", *TINY, f"data.eval={tmp / 'tasks.jsonl'}"]


def compare_a_directory(tmp: Path, inputs: Inputs) -> list[str]:
    (tmp / "b.json").write_text("{}")
    return ["eval", "--compare", str(tmp), str(tmp / "b.json")]


def compare_a_list(tmp: Path, inputs: Inputs) -> list[str]:
    (tmp / "a.json").write_text("[1, 2]")
    (tmp / "b.json").write_text('{"pass@1": 0.5}')
    return ["eval", "--compare", str(tmp / "a.json"), str(tmp / "b.json")]


def foreign_run_dir(tmp: Path, inputs: Inputs) -> list[str]:
    theirs = tmp / "theirs"
    for name in ("config.yaml", "final/model.bin", "checkpoints/round_00001/notes.txt", "metrics.jsonl"):
        (theirs / name).parent.mkdir(parents=True, exist_ok=True)
        (theirs / name).write_text(f"someone else's {name}\n")
    return train(QUICKSTART, theirs)


def foreign_rollout_for_a_round(tmp: Path, inputs: Inputs) -> list[str]:
    run = copy_run(inputs, tmp)
    shutil.rmtree(run / "checkpoints")
    shutil.rmtree(run / "final")
    (run / "metrics.jsonl").unlink()
    shutil.copy(inputs.rollouts, run / "rollouts" / "round_00000.parquet")
    return train(QUICKSTART, run, "train.iterations=2")  # the run's own recipe


def bad_metrics_line(tmp: Path, inputs: Inputs) -> list[str]:
    run = copy_run(inputs, tmp)
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text(lines[0] + "not json\n" + lines[1])
    return train(QUICKSTART, run, "train.iterations=3")


def busy_run_dir(tmp: Path, inputs: Inputs) -> list[str]:
    run = copy_run(inputs, tmp)
    lock = os.open(run / LOCK, os.O_RDWR)  # held by this test process for the duration of the case
    fcntl.flock(lock, fcntl.LOCK_EX)
    os.pwrite(lock, f"{os.getpid()}\n".encode(), 0)
    return train(QUICKSTART, run, "train.iterations=3")


def rollouts_into_a_foreign_dir(tmp: Path, inputs: Inputs) -> list[str]:
    (tmp / "theirs").mkdir()
    (tmp / "theirs" / "rollouts.parquet").write_text("their data\n")
    return ["rollout", str(QUICKSTART), f"run_dir={tmp / 'theirs'}", *TINY]


# ---- the second hostile table (issue 26): subtly wrong models, files, values and plugins ---------


def weights_changed(tmp: Path, inputs: Inputs, change: Callable[[dict], dict]) -> Path:
    """A copy of the finished run's final/ with its tensors changed."""
    ckpt = copy_run(inputs, tmp) / "final"
    save_file(change(load_file(ckpt / "model.safetensors")), ckpt / "model.safetensors", metadata={"format": "pt"})
    return ckpt


def missing_tensor_eval(tmp: Path, inputs: Inputs) -> list[str]:
    ckpt = weights_changed(tmp, inputs, lambda w: {k: v for k, v in w.items() if k != "model.norm.weight"})
    return ["eval", str(QUICKSTART), f"run_dir={tmp / 'out'}", *TINY, "--policy", str(ckpt)]


def peft_named_weights_train(tmp: Path, inputs: Inputs) -> list[str]:
    ckpt = weights_changed(tmp, inputs, lambda w: {f"base_model.model.{k}": v for k, v in w.items()})
    return train(QUICKSTART, tmp / "out", f"model.path={ckpt}")


def misshaped_tensor_inspect(tmp: Path, inputs: Inputs) -> list[str]:
    ckpt = weights_changed(tmp, inputs, lambda w: w | {"model.norm.weight": w["model.norm.weight"][:-1].clone()})
    return ["inspect-ratios", str(inputs.rollouts), "--policy", str(ckpt)]


def corrupt_tokenizer_eval(tmp: Path, inputs: Inputs) -> list[str]:
    ckpt = copy_run(inputs, tmp) / "final"
    (ckpt / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    return ["eval", str(QUICKSTART), f"run_dir={tmp / 'out'}", *TINY, "--policy", str(ckpt)]


def tasks_file(tmp: Path, *questions: str, ids: tuple[str, ...] = ()) -> Path:
    rows = [{"id": ids[i] if ids else f"p{i}", "question": q, "answer": "2"} for i, q in enumerate(questions)]
    (tmp / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp / "tasks.jsonl"


def rollout_output_is_the_task_file(tmp: Path, inputs: Inputs) -> list[str]:
    tasks = tasks_file(tmp, "1+1", "2+0", "0+2", "3-1")
    return ["rollout", str(QUICKSTART), f"run_dir={tmp / 'out'}", *TINY, f"data.train={tasks}",
            f"rollout.output={tasks}"]  # fmt: skip


def rollout_output_over_their_parquet(tmp: Path, inputs: Inputs) -> list[str]:
    pq.write_table(pa.table({"their": [1, 2]}), tmp / "theirs.parquet")
    return ["rollout", str(QUICKSTART), f"run_dir={tmp / 'out'}", *TINY, f"rollout.output={tmp / 'theirs.parquet'}"]


def eval_json_over_their_file(tmp: Path, inputs: Inputs) -> list[str]:
    (tmp / "their.json").write_text('{"notes": "mine"}\n')
    return ["eval", str(QUICKSTART), f"run_dir={tmp / 'out'}", *TINY, "--json", str(tmp / "their.json")]


def section_given_twice(tmp: Path, inputs: Inputs) -> list[str]:
    (tmp / "r.yaml").write_text(f"run_dir: {tmp / 'out'}\noptim:\n  lr: 1.0e-4\ntrain:\n  iterations: 2\n"
                                "optim:\n  betas: [0.9, 0.99]\n")  # fmt: skip
    return ["train", str(tmp / "r.yaml")]


def key_given_twice(tmp: Path, inputs: Inputs) -> list[str]:
    (tmp / "r.yaml").write_text(f"run_dir: {tmp / 'out'}\noptim:\n  lr: 1.0e-4\n  lr: 3.0e-4\n")
    return ["train", str(tmp / "r.yaml")]


def infinite_lr(tmp: Path, inputs: Inputs) -> list[str]:
    return train(QUICKSTART, tmp / "out", "optim.lr=.inf")


def betas_at_one(tmp: Path, inputs: Inputs) -> list[str]:
    return train(QUICKSTART, tmp / "out", "optim.betas=[0.9, 1.0]")


def seed_beyond_64_bits(tmp: Path, inputs: Inputs) -> list[str]:
    return train(QUICKSTART, tmp / "out", f"seed={2**70}")


def underflowing_temperature(tmp: Path, inputs: Inputs) -> list[str]:
    return ["rollout", str(QUICKSTART), f"run_dir={tmp / 'out'}", *TINY, "sampler.options.temperature=1e-300"]


def duplicated_rollout_rows(tmp: Path, inputs: Inputs) -> list[str]:
    doubled = with_rows(inputs, tmp / "doubled.parquet", lambda rows: [*rows, rows[1]])
    return train(QUICKSTART, tmp / "out", f"train.rollouts={doubled}")


def empty_prompt_ids_in_rollouts(tmp: Path, inputs: Inputs) -> list[str]:
    bad = with_rows(inputs, tmp / "bad.parquet", lambda rows: [*rows[:2], {**rows[2], "prompt_token_ids": []}])
    return train(QUICKSTART, tmp / "out", f"train.rollouts={bad}")


def group_size_one(tmp: Path, inputs: Inputs) -> list[str]:
    return train(QUICKSTART, tmp / "out", "train.group_size=1")


def prompt_past_the_context_window(tmp: Path, inputs: Inputs) -> list[str]:
    tasks = tasks_file(tmp, "1+1", "1+" * 400 + "1", ids=("short", "long"))
    return ["rollout", str(QUICKSTART), f"run_dir={tmp / 'out'}", *TINY, f"data.train={tasks}"]


def max_new_tokens_past_the_context_window(tmp: Path, inputs: Inputs) -> list[str]:
    return ["eval", str(QUICKSTART), f"run_dir={tmp / 'out'}", *TINY, "sampler.options.max_new_tokens=600"]


def empty_prompt(tmp: Path, inputs: Inputs) -> list[str]:
    tasks = tasks_file(tmp, "1+1", "  ")
    return ["rollout", str(QUICKSTART), f"run_dir={tmp / 'out'}", *TINY, f"data.train={tasks}"]


def empty_prompt_id(tmp: Path, inputs: Inputs) -> list[str]:
    tasks = tasks_file(tmp, "1+1", "2+2", ids=("a", ""))
    return ["rollout", str(QUICKSTART), f"run_dir={tmp / 'out'}", *TINY, f"data.train={tasks}"]


def named_pipe_task_file(tmp: Path, inputs: Inputs) -> list[str]:
    os.mkfifo(tmp / "tasks.jsonl")
    return ["rollout", str(QUICKSTART), f"run_dir={tmp / 'out'}", *TINY, f"data.train={tmp / 'tasks.jsonl'}"]


REWARDS = """
import math

def raising(prompts, completions, **columns):
    raise ZeroDivisionError("the user's bug")

def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return math.nan
"""


def python_reward(tmp: Path, function: str) -> list[str]:
    (tmp / "rewards.py").write_text(REWARDS)
    return ["verifier.name=python", f"verifier.options={{path: {tmp / 'rewards.py'}, function: {function}}}"]


def reward_function_that_raises(tmp: Path, inputs: Inputs) -> list[str]:
    return ["rollout", str(QUICKSTART), f"run_dir={tmp / 'out'}", *TINY, *python_reward(tmp, "raising")]


def reward_function_returning_nan(tmp: Path, inputs: Inputs) -> list[str]:
    return ["eval", str(QUICKSTART), f"run_dir={tmp / 'out'}", *TINY, *python_reward(tmp, "compute_score")]


def run_dir_under_a_file(tmp: Path, inputs: Inputs) -> list[str]:
    (tmp / "afile").write_text("not a directory\n")
    return train(QUICKSTART, tmp / "afile" / "out")


def run_dir_name_too_long(tmp: Path, inputs: Inputs) -> list[str]:
    return ["rollout", str(QUICKSTART), f"run_dir={tmp / ('x' * 300)}", *TINY]


@dataclass(frozen=True)
class Case:
    build: Callable[[Path, Inputs], list[str]]
    says: tuple[str, ...]  # fragments of the one error line (file, row, key, what to do)
    created: str | None = "out"  # a run_dir the command must not leave behind
    may_change: frozenset[str] = frozenset()  # outputs the command may legitimately rewrite


CASES = [
    Case(binary_recipe, ("r.yaml", "not UTF-8")),
    Case(empty_recipe, ("r.yaml", "empty")),
    Case(comments_only_recipe, ("r.yaml", "empty")),
    Case(recipe_not_a_mapping, ("r.yaml", "mapping")),
    Case(alias_bomb, ("r.yaml", "aliases expand")),
    Case(huge_recipe, ("r.yaml", "bytes")),
    Case(unknown_key, ("train.iteratons",)),
    Case(missing_recipe, ("recipe not found", "nope.yaml")),
    Case(nan_logprob, ("bad.parquet", "row 3", "behavior_logprobs[1] = nan", "finite")),
    Case(infinite_logprob, ("bad.parquet", "row 2", "behavior_logprobs[0] = -inf")),
    Case(positive_logprob, ("bad.parquet", "row 5", "= 0.5", "<= 0")),
    Case(zero_rows_train, ("empty.parquet", "no rows")),
    Case(zero_rows_inspect, ("empty.parquet", "no rows")),
    Case(response_id_outside_vocabulary, ("bad.parquet", "row 4", "response_token_ids id 1000000", "vocabulary")),
    Case(prompt_id_outside_vocabulary, ("bad.parquet", "row 1", "prompt_token_ids id -5", "vocabulary")),
    Case(corrupt_parquet, ("cut.parquet", "truncated or corrupt")),
    Case(foreign_parquet, ("foreign.parquet", "not written by minpro")),
    Case(truncated_weights_eval, ("final", "cannot load checkpoint", "truncated or corrupt")),
    Case(truncated_weights_resume, ("round_00002", "cannot load checkpoint")),
    Case(truncated_optimizer_resume, ("round_00002/dcp/shard-00001", "truncated or corrupt", "delete")),
    Case(pickled_checkpoint_format, ("round_00002", "not a resumable minpro checkpoint", "unpickling")),
    Case(lone_surrogate_answer, ("tasks.jsonl:1", "answer", "surrogate")),
    Case(non_utf8_task_file, ("tasks.jsonl", "not UTF-8")),
    Case(compare_a_directory, ("eval result not found",)),
    Case(compare_a_list, ("a.json", "not an eval result")),
    Case(foreign_run_dir, ("theirs", "not a minpro run directory", MARKER)),
    # a run with no checkpoint starts over: it records its recipe before it reads round 0's file
    Case(foreign_rollout_for_a_round, ("round_00000.parquet", "not this run's round 0", "move the file away"),
         may_change=frozenset({"run/config.yaml"})),
    Case(bad_metrics_line, ("metrics.jsonl", "line 2")),
    Case(busy_run_dir, ("in use by another minpro process", f"pid {os.getpid()}")),
    Case(rollouts_into_a_foreign_dir, ("theirs", "not a minpro run directory")),
]
CASES += [  # the second hostile table
    Case(missing_tensor_eval, ("final", "model.norm.weight is missing")),
    Case(peft_named_weights_train, ("final", "base_model.model.", "PEFT", "merge_and_unload")),
    Case(misshaped_tensor_inspect, ("final", "model.norm.weight has shape [127] where the model needs [128]")),
    Case(corrupt_tokenizer_eval, ("tokenizer", "final")),
    Case(rollout_output_is_the_task_file, ("rollout.output", "tasks.jsonl", "minpro did not write it")),
    Case(rollout_output_over_their_parquet, ("rollout.output", "theirs.parquet", "minpro did not write it")),
    Case(eval_json_over_their_file, ("eval --output", "their.json", "minpro did not write it")),
    Case(section_given_twice, ("r.yaml", "'optim' is given twice", "lines 2 and 6")),
    Case(key_given_twice, ("r.yaml", "'lr' is given twice")),
    Case(infinite_lr, ("optim.lr", "less than 1000000000000000000000000000000 (got inf)")),
    Case(betas_at_one, ("optim.betas.1", "less than 1")),
    Case(seed_beyond_64_bits, ("'seed'", "less than")),
    Case(underflowing_temperature, ("sampler.options", "temperature")),
    Case(duplicated_rollout_rows, ("doubled.parquet", "rows 1 and", "double weight")),
    Case(empty_prompt_ids_in_rollouts, ("bad.parquet", "row 2", "prompt_token_ids")),
    Case(group_size_one, ("train.group_size", "greater than or equal to 2")),
    Case(prompt_past_the_context_window, ("problem 'long'", "context window of 512")),
    Case(max_new_tokens_past_the_context_window, ("max_new_tokens=600", "context window")),
    Case(empty_prompt, ("tasks.jsonl:2", "prompt", "empty")),
    Case(empty_prompt_id, ("tasks.jsonl:2", "id is empty")),
    Case(named_pipe_task_file, ("tasks.jsonl", "not a regular file")),
    Case(reward_function_that_raises, ("verifier 'python'", "problem '", "rewards.py:raising", "ZeroDivisionError")),
    Case(reward_function_returning_nan, ("verifier 'python'", "problem '", "rewards.py:compute_score", "returned nan")),
    Case(run_dir_under_a_file, ("cannot create run directory", "afile")),
    Case(run_dir_name_too_long, ("cannot create run directory", "too long")),
]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file's bytes but the lock's (which records the pid of its last holder)."""
    files = [p for p in sorted(directory.rglob("*")) if p.is_file() and p.name != LOCK]
    return {str(p.relative_to(directory)): p.read_bytes() for p in files}


@dataclass
class Outcome:
    result: subprocess.CompletedProcess[str]
    before: dict[str, bytes]
    after: dict[str, bytes]
    directory: Path


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, inputs) -> dict[str, Outcome]:
    """Every case, two at a time, each in a process forked from a server that imported the CLI
    once (`cli_forkserver.py`): a fresh interpreter per case was mostly start-up."""
    built = {}
    for case in CASES:
        directory = tmp_path_factory.mktemp(case.build.__name__)
        built[case.build.__name__] = (directory, case.build(directory, inputs), snapshot(directory))

    servers = queue.Queue()
    for _ in range(2):
        servers.put(ForkServer(CLI_ENV))

    def run(name: str) -> Outcome:
        directory, args, before = built[name]
        server = servers.get()
        try:
            result = server.run(directory, args)
        finally:
            servers.put(server)
        return Outcome(result, before, snapshot(directory), directory)

    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            return dict(zip(built, pool.map(run, built)))
    finally:
        while not servers.empty():
            servers.get().close()


@pytest.mark.parametrize("case", CASES, ids=[c.build.__name__ for c in CASES])
def test_bad_input_is_one_clear_line_and_leaves_nothing(outcomes, case):
    outcome = outcomes[case.build.__name__]
    output = outcome.result.stdout + outcome.result.stderr
    assert outcome.result.returncode == 2, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    for fragment in case.says:
        assert fragment in errors[0], (fragment, errors[0])
    if case.created:
        assert not (outcome.directory / case.created).exists()
    before, after = outcome.before, outcome.after
    changed = {name for name in before if after.get(name) != before[name]} - case.may_change
    assert not changed, f"inputs changed or deleted: {sorted(changed)}"
    added = {name for name in after if name not in before}
    assert not added, f"left behind: {sorted(added)}"
    assert not (outcome.directory / CANARY).exists()


def test_a_truncated_last_metrics_line_is_dropped_with_a_warning_and_the_run_resumes(tmp_path, inputs):
    run = copy_run(inputs, tmp_path)
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"round": 2, "step": 3, "lo')  # a short write on a full disk
    result = minpro(tmp_path, *train(QUICKSTART, run, "train.iterations=3"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "line 3 is incomplete" in result.stderr
    assert [json.loads(line)["round"] for line in metrics.read_text().splitlines()] == [0, 1, 2]


def test_a_symlinked_final_dir_is_replaced_and_its_target_left_alone(tmp_path, inputs):
    run = copy_run(inputs, tmp_path)
    elsewhere = tmp_path / "shared-storage"
    shutil.move(run / "final", elsewhere)
    (run / "final").symlink_to(elsewhere, target_is_directory=True)
    kept = snapshot(elsewhere)
    result = minpro(tmp_path, *train(QUICKSTART, run, "train.iterations=3"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (run / "final").is_dir() and not (run / "final").is_symlink()
    assert (run / "final" / "model.safetensors").is_file()
    assert snapshot(elsewhere) == kept
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == [LOCK, MARKER]


def test_leftovers_of_killed_writes_are_cleaned_on_the_next_run(tmp_path, inputs):
    run = copy_run(inputs, tmp_path)
    leftovers = [run / "rollouts" / ".round_00002.parquet.x1y2.tmp", run / ".metrics.jsonl.ab12.tmp"]
    for path in leftovers:
        path.write_bytes(b"")
    (run / "checkpoints" / ".round_00003.partial" / "dcp").mkdir(parents=True)
    result = minpro(tmp_path, *train(QUICKSTART, run, "train.iterations=3"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert not any(p.exists() for p in leftovers)
    assert not (run / "checkpoints" / ".round_00003.partial").exists()


def test_a_malicious_pickle_next_to_a_checkpoint_is_never_loaded(tmp_path, inputs):
    """torch's default DCP storage would unpickle `.metadata` (and the optimizer's non-tensor
    entries); the safetensors storage minpro writes reads neither, so resuming runs no code."""
    run = copy_run(inputs, tmp_path)
    dcp = run / "checkpoints" / "round_00002" / "dcp"
    (dcp / ".metadata").write_bytes(malicious_pickle(tmp_path))
    (dcp / "__0_0.distcp").write_bytes(malicious_pickle(tmp_path))
    result = minpro(tmp_path, *train(QUICKSTART, run, "train.iterations=3"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resuming from" in result.stderr and "round_00002" in result.stderr
    assert not (tmp_path / CANARY).exists()
    assert [json.loads(line)["round"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_nothing_in_a_checkpoint_is_a_pickle(inputs):
    for path in (inputs.run / "checkpoints").rglob("*"):
        if path.is_file():
            head = path.read_bytes()[:2]
            assert head != b"\x80\x04" and head[:1] != b"\x80", f"{path} looks like a pickle"
            assert path.suffix in {".safetensors", ".json", ""} or path.name == "tokenizer.json", path
    groups = json.loads(next((inputs.run / "checkpoints").glob("round_*/optimizer_param_groups.json")).read_text())
    assert groups[0]["lr"] == pytest.approx(1e-4) and groups[0]["params"]


def test_a_full_disk_is_one_line_naming_the_path_and_keeps_the_last_checkpoint(tmp_path, inputs):
    """A file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored) makes the kernel fail writes past it
    (EFBIG), as a full disk does (ENOSPC): the checkpoint write fails; the last one stays whole."""
    import resource
    import signal

    run = copy_run(inputs, tmp_path)
    before = snapshot(run / "checkpoints" / "round_00002")

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))  # the weights are 3.5 MB

    result = minpro(tmp_path, *train(QUICKSTART, run, "train.iterations=3"), preexec=limit_file_size)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot write" in errors[0] and "round_00003" in errors[0], output
    assert "File too large" in errors[0] and "rerun" in errors[0]
    assert snapshot(run / "checkpoints" / "round_00002") == before
    assert not (run / "checkpoints" / "round_00003").exists()
    assert not list((run / "checkpoints").glob(".round_*"))
    # with the space back, the same command resumes from the intact checkpoint and finishes
    result = minpro(tmp_path, *train(QUICKSTART, run, "train.iterations=3"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (run / "final" / "model.safetensors").is_file()
    assert load_file(run / "final" / "model.safetensors").keys() == load_file(inputs.run / "final" / "model.safetensors").keys()
