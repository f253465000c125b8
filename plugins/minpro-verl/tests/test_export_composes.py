"""`minpro export verl`'s commands compose against verl 0.9.1's own configs: every key exists
(hydra raises on an unknown one) and takes the value minpro meant. Runs in the scratch verl
environment (scripts/setup_verl_env.sh), calling the checkout's `.venv/bin/minpro`."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
MINPRO = ROOT / ".venv" / "bin" / "minpro"
pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("verl") is None, reason="verl is not installed (opt-in)"),
    pytest.mark.skipif(not MINPRO.exists(), reason="the checkout's .venv (bash scripts/setup.sh) is missing"),
]
CONFIGS = {  # verl's entry module → (its config directory under verl/, its config name)
    "verl.trainer.main_ppo": ("trainer/config", "ppo_trainer"),
    "verl.experimental.one_step_off_policy.main_ppo": ("experimental/one_step_off_policy/config",
                                                       "one_step_off_ppo_trainer"),
    "verl.experimental.fully_async_policy.fully_async_main": ("experimental/fully_async_policy/config",
                                                              "fully_async_ppo_trainer"),
}  # fmt: skip


@pytest.mark.parametrize(
    "overrides",
    [[], ["train.staleness=1", "train.minibatches=2"], ["train.staleness=3", "model.lora.r=8"],
     ["train.anchor=sampling_weights", "correction.level=token", "train.kl_coef=0.01", "optim.schedule=cosine"]],
)  # fmt: skip
def test_the_exported_command_composes(overrides, monkeypatch):
    import verl
    from hydra import compose, initialize_config_dir

    text = subprocess.run([str(MINPRO), "export", "verl", str(ROOT / "recipes" / "quickstart.yaml"), *overrides],
                          check=True, capture_output=True, text=True).stdout  # fmt: skip
    command = text.split("\n\n")[0].replace("\\\n", " ").split()
    entry, lines = command[2], command[3:]
    values = {"$DATA": "/data", "$MODEL": "/models/m", "$MINPRO_VERL_REWARD": "/r.py"}
    for placeholder, value in values.items():
        lines = [line.replace(placeholder, value) for line in lines]
    directory, name = CONFIGS[entry]
    package = Path(verl.__file__).parent
    monkeypatch.chdir(package.parent)  # one-step-off's config finds ppo_trainer at file://verl/trainer/config
    with initialize_config_dir(config_dir=str(package / directory), version_base=None):
        config = compose(config_name=name, overrides=lines)  # an unknown key raises
    actor, rollout = config.actor_rollout_ref.actor, config.actor_rollout_ref.rollout
    assert actor.policy_loss.loss_mode == "minpro" and actor.clip_ratio_low == 1.0 and rollout.top_k == -1
    assert rollout.n == 8 and config.data.train_batch_size == 64 and not config.algorithm.rollout_correction.bypass_mode
    assert config.reward.custom_reward_function.path == "/r.py"
    if "train.staleness=3" in overrides:
        assert config.async_training.staleness_threshold == 2 and config.actor_rollout_ref.model.lora_rank == 8
    if "correction.level=token" in overrides:
        assert config.algorithm.rollout_correction.rollout_is == "token"
    assert os.path.basename(config.data.train_files) == "train.parquet"
