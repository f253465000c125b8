"""`minpro export verl` / `verl-data`: the recipe → verl mapping, and the data verl trains on.
That every key exists in verl 0.9.1's config is checked in the scratch verl environment
(plugins/minpro-verl/tests/test_export_composes.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from minpro_cli.config import load_recipe
from minpro_cli.errors import ConfigError, RunDirError
from minpro_cli.export import verl_command, write_verl_data
from minpro_cli.sampling import load_split

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def mapped(*overrides: str) -> tuple[str, dict[str, str]]:
    export = verl_command(load_recipe(QUICKSTART, list(overrides)))
    return export.mode, dict(o.split("=", 1) for o in export.overrides())


def test_the_quickstart_maps_key_by_key():
    mode, keys = mapped("train.minibatches=4", "train.epochs=2", "objective.options.eps_low=0.3", "train.kl_coef=0.01")
    assert mode == "sync"
    expected = {
        "actor_rollout_ref.actor.policy_loss.loss_mode": "minpro",
        "actor_rollout_ref.actor.clip_ratio_low": "0.3", "actor_rollout_ref.actor.clip_ratio_high": "0.2",
        "data.train_batch_size": "64", "actor_rollout_ref.actor.ppo_mini_batch_size": "16",
        "actor_rollout_ref.actor.ppo_epochs": "2", "actor_rollout_ref.rollout.n": "8",
        "actor_rollout_ref.rollout.top_k": "-1", "data.max_response_length": "48",
        "actor_rollout_ref.actor.use_kl_loss": "true", "actor_rollout_ref.actor.kl_loss_type": "low_var_kl",
        "actor_rollout_ref.actor.kl_loss_coef": "0.01", "algorithm.rollout_correction.bypass_mode": "false",
        "trainer.total_training_steps": "80", "reward.custom_reward_function.name": "compute_score",
    }  # fmt: skip
    assert {k: keys.get(k) for k in expected} == expected


@pytest.mark.parametrize(
    ("overrides", "mode", "async_keys"),
    [
        (["train.staleness=1"], "one_step_off", {}),
        (["train.staleness=3", "train.minibatches=2"], "fully_async",
         {"async_training.staleness_threshold": "2", "async_training.trigger_parameter_sync_step": "2"}),
        (["train.max_staleness=4", "train.minibatches=2", "sampler.options.placement=dedicated"], "fully_async",
         {"async_training.staleness_threshold": "1", "async_training.partial_rollout": "false"}),
    ],
)  # fmt: skip
def test_staleness_picks_verls_trainer(overrides, mode, async_keys):
    found, keys = mapped(*overrides)
    assert found == mode
    assert keys["trainer.n_gpus_per_node"] == "4" and keys["rollout.n_gpus_per_node"] == "4"
    assert {k: keys.get(k) for k in async_keys} == async_keys


def test_what_does_not_carry_over_is_said():
    export = verl_command(load_recipe(QUICKSTART, ["train.anchor=sampling_weights", "correction.level=prefix_min",
                                                   "optim.schedule=linear", "train.drop_zero_variance_groups=true"]))
    assert "algorithm.rollout_correction.rollout_is" not in dict(o.split("=", 1) for o in export.overrides())
    for said in ("prefix-aware", "round_start", "optim.schedule=linear", "drop_zero_variance_groups"):
        assert any(said in n for n in export.notes), said
    text = export.text()
    assert text.startswith("python3 -m verl.trainer.main_ppo \\\n") and "<- train.group_size" in text


@pytest.mark.parametrize(
    ("overrides", "message"),
    [(["objective.name=m2po", "objective.options={}"], "no verl policy loss"), (["train.minibatches=3"], "multiple of")],
)
def test_refusals(overrides, message):
    with pytest.raises(ConfigError, match=message):
        verl_command(load_recipe(QUICKSTART, overrides))


def test_verl_data_rows_are_scored_by_the_recipes_verifier(tmp_path):
    recipe = load_recipe(QUICKSTART, ["data.system_prompt=Think."])
    written = write_verl_data(recipe, tmp_path)
    assert [p.name for p in written] == ["train.parquet", "val.parquet"]
    rows, problems = pq.read_table(written[0]).to_pylist(), load_split(recipe, "train")
    assert len(rows) == len(problems) > 100
    first = rows[0]
    assert first["prompt"] == [{"role": "system", "content": "Think."},
                               {"role": "user", "content": problems[0].question + "\n"}]  # fmt: skip
    assert first["reward_model"] == {"style": "rule", "ground_truth": problems[0].answer}
    spec = importlib.util.spec_from_file_location(
        "minpro_verl_reward", ROOT / "plugins" / "minpro-verl" / "src" / "minpro_verl" / "reward.py"
    )
    reward = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reward)
    score = [reward.compute_score(r["data_source"], f"so \\boxed{{{r['reward_model']['ground_truth']}}}",
                                  r["reward_model"]["ground_truth"], r["extra_info"]) for r in rows[:5]]  # fmt: skip
    wrong = reward.compute_score(first["data_source"], "so \\boxed{123456789}", first["reward_model"]["ground_truth"],
                                 first["extra_info"])  # fmt: skip
    assert score == [1.0] * 5 and wrong == 0.0
    with pytest.raises(ValueError, match="minpro export verl-data"):
        reward.compute_score("gsm8k", "1", "1", {})
    assert write_verl_data(recipe, tmp_path) == written  # its own files are replaced on a rerun …
    (tmp_path / "val.parquet").write_text("someone's data")
    with pytest.raises(RunDirError, match="minpro did not write it"):  # … anyone else's are not
        write_verl_data(recipe, tmp_path)
    assert (tmp_path / "val.parquet").read_text() == "someone's data"
