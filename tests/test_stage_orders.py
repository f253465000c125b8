"""Stages claim a run directory the same way, so they run into one directory in every order a
user would (`scripts/smollm2_rl.sh` evaluates first); outputs have the usual permissions; two
policies of one name keep their own evaluation; a LoRA adapter loads with peft's Auto class."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from minpro_cli.config import load_recipe
from minpro_cli.eval import run_eval
from minpro_cli.rollout import run_rollout
from minpro_cli.rundir import MARKER
from minpro_cli.train import run_train

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
TINY = ["rollout.num_prompts=4", "rollout.group_size=2", "sampler.options.max_new_tokens=8", "train.iterations=1",
        "train.prompts_per_iteration=2", "train.group_size=2", "optim.warmup_steps=0", "eval.max_problems=2",
        "eval.n_samples=1", "eval.k=[1]"]  # fmt: skip


def recipe(run_dir: Path, *extra: str):
    return load_recipe(QUICKSTART, [f"run_dir={run_dir}", *TINY, *extra])


@pytest.mark.parametrize("order", [("eval", "train", "eval"), ("rollout", "train"), ("train", "eval")])
def test_stages_run_into_one_directory_in_every_order(tmp_path, order):
    run_dir = tmp_path / "run"
    stages = {"rollout": run_rollout, "train": run_train, "eval": run_eval}
    for index, stage in enumerate(order):
        extra = ["eval.policy=" + str(run_dir / "final")] if stage == "eval" and "train" in order[:index] else []
        stages[stage](recipe(run_dir, *extra))
    assert (run_dir / MARKER).exists()
    if "train" in order:
        assert (run_dir / "final" / ".complete").exists()
    if order[-1] == "eval":
        assert (run_dir / "eval" / ("final.json" if "train" in order else "embedded.json")).exists()


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished run, trained under umask 022 with a checkpoint every round."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    old = os.umask(0o022)
    try:
        run_train(recipe(run_dir, "train.checkpoint_every=1"))
    finally:
        os.umask(old)
    return run_dir


def test_trained_weights_are_readable_by_other_users_as_the_umask_allows(finished):
    for path in [*(finished / "final").iterdir(), *(finished / "checkpoints").rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


def test_two_policies_named_final_keep_their_own_evaluation(tmp_path, finished):
    other = tmp_path / "b" / "final"
    shutil.copytree(finished / "final", other)
    eval_dir = tmp_path / "evals"
    for policy in (finished / "final", other):
        run_eval(recipe(eval_dir, f"eval.policy={policy}"))
    results = sorted((eval_dir / "eval").glob("final*.json"))
    assert len(results) == 2, results
    assert {json.loads(p.read_text())["policy"] for p in results} == {str(finished / "final"), str(other)}
    run_eval(recipe(eval_dir, f"eval.policy={finished / 'final'}"))  # again: replaces its own result
    assert len(sorted((eval_dir / "eval").glob("final*.json"))) == 2


def test_a_lora_adapter_loads_with_autopeft_from_another_directory(tmp_path, monkeypatch):
    peft = pytest.importorskip("peft")
    run_train(recipe(tmp_path / "run", "model.lora={r: 4, alpha: 8}"))
    adapter = tmp_path / "run" / "final" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and Path(config["base_model_name_or_path"]).is_absolute()
    monkeypatch.chdir(tmp_path)  # the base path must not depend on where minpro ran
    model = peft.AutoPeftModelForCausalLM.from_pretrained(str(adapter))
    assert type(model).__name__ == "PeftModelForCausalLM"


def test_a_stored_round_with_no_signal_warns_and_a_run_with_none_says_so(tmp_path, capsys):
    """Every group scored alike (the docs' old `reward > 0` filter did that): advantage 0."""
    import pyarrow.parquet as pq

    from minpro_cli.rollouts import read_rollouts, write_rollouts

    rollouts = run_rollout(recipe(tmp_path / "sampled"))
    rows = [row | {"reward": 1.0} for row in read_rollouts(rollouts).to_pylist()]
    write_rollouts(tmp_path / "good.parquet", rows, {})
    assert pq.read_table(tmp_path / "good.parquet").num_rows == 8
    run_train(recipe(tmp_path / "run", f"train.rollouts={tmp_path / 'good.parquet'}", "train.iterations=2"))
    err = capsys.readouterr().err
    assert err.count("every group's responses got the same reward (every advantage is 0)") == 2, err
    assert "no round of this run had a reward signal" in err


def test_more_prompts_per_round_than_problems_take_each_once_and_the_round_file_is_reused(tmp_path, capsys):
    from minpro_cli.modeling import load_policy
    from minpro_cli.rounds import OnlineRounds
    from minpro_cli.sampling import Plugins

    (tmp_path / "three.jsonl").write_text("".join(
        json.dumps({"id": f"p{i}", "question": f"Compute {i}+1.", "answer": str(i + 1)}) + "\n" for i in range(3)))
    loaded = recipe(tmp_path / "run", f"data.train={tmp_path / 'three.jsonl'}", "train.prompts_per_iteration=5")
    (tmp_path / "run").mkdir()
    policy = load_policy("embedded")
    first = OnlineRounds(loaded, policy, Plugins.of(loaded), tmp_path / "run").rows(0, None, 0)
    assert "exceeds the 3 training problems" in capsys.readouterr().err
    assert sorted((r.prompt_id, r.sample_index) for r in first) == [(f"p{i}", k) for i in range(3) for k in range(2)]
    again = OnlineRounds(loaded, policy, Plugins.of(loaded), tmp_path / "run").rows(0, None, 0)  # as after a kill
    assert [r.response for r in again] == [r.response for r in first]
