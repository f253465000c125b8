"""`minpro train` with every objective by name, and the advantage options of the train config."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minpro_cli.advantages import group_indices, rloo_advantages, zero_variance_groups
from minpro_cli.config import load_recipe
from minpro_cli.registry import discover
from minpro_cli.rollout import run_rollout
from minpro_cli.rollouts import read_rollout_rows, write_rollouts
from minpro_cli.sampling import Plugins
from minpro_cli.step import training_batch
from minpro_cli.train import run_train

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
DEFAULT_WEIGHTS = ROOT / "src/minpro_cli/assets/default_model/model.safetensors"
SMALL = ["rollout.num_prompts=6", "rollout.group_size=4", "sampler.options.max_new_tokens=40",
         "train.prompts_per_iteration=6", "train.iterations=1", "optim.warmup_steps=0", "optim.lr=1e-3"]
OBJECTIVE_METRICS = {
    "minpro": "min_prefix_ratio_mean", "prefix": "prefix_ratio_mean", "gspo": "seq_ratio_mean",
    "m2po": "m2_masked_frac", "grpo": "clip_frac_high", "dapo": "clip_frac_high", "dr_grpo": "clip_frac_high",
    "cispo": "weight_mean", "ctpo": "weight_p50", "pnpo": "weight_p50", "ctpo_la": "weight_p50",
    "gmpo": "sequence_ratio_mean", "dppo_tv": "masked_frac", "dppo_kl": "masked_frac",
    "ce_gppo": "clip_frac_high", "gipo": "weight_mean",
    "cppo": "budget_rate_mean", "topr": "positive_frac", "sapo": "gradient_weight_mean",
}


@pytest.fixture(scope="module")
def stored_rollouts(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("rollout")
    return run_rollout(load_recipe(QUICKSTART, [f"run_dir={run_dir}", *SMALL]))


def test_every_builtin_objective_is_covered():
    assert set(discover("objectives")) == set(OBJECTIVE_METRICS)


@pytest.mark.parametrize("name", sorted(OBJECTIVE_METRICS))
def test_train_runs_with_each_objective_by_name(tmp_path, stored_rollouts, name):
    recipe = load_recipe(QUICKSTART, [f"run_dir={tmp_path}", *SMALL, f"train.rollouts={stored_rollouts}",
                                      f"objective.name={name}", "objective.options={}"])
    final = run_train(recipe)
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert torch.isfinite(torch.tensor(record["loss"])) and OBJECTIVE_METRICS[name] in record
    before = load_file(DEFAULT_WEIGHTS)
    after = load_file(final / "model.safetensors")
    moved = max((after[k] - before[k]).abs().max().item() for k in before)
    assert moved > 0, f"{name}: one optimizer step left every weight unchanged"


def test_dr_grpo_normaliser_is_the_sampler_length(tmp_path, stored_rollouts):
    """Dr.GRPO's L is the sampler's max_new_tokens (40 here), not the longest response: the
    logged loss of one step is Σ ℓ / (B · 40) with ℓ_t = −Â·ρ_t = −Â on-policy."""
    recipe = load_recipe(QUICKSTART, [f"run_dir={tmp_path}", *SMALL, "objective.name=dr_grpo", "objective.options={}",
                                      f"train.rollouts={stored_rollouts}"])
    assert Plugins.of(recipe).generation_budget == 40
    run_train(recipe)
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rows = read_rollout_rows(stored_rollouts)
    batch = training_batch(rows, "dr_grpo", drop_zero_variance=False)
    assert batch is not None and max(len(r) for r in batch.responses) < 40
    expected = -sum(float(a) * len(r) for a, r in zip(batch.advantages, batch.responses)) / (len(rows) * 40)
    # the stored μ equals π_θ at step 0 up to sampling-vs-training rounding, so ρ ≈ 1
    assert record["loss"] == pytest.approx(expected, abs=1e-5)
    longest = max(len(r) for r in batch.responses)
    assert abs(expected * 40 / longest - expected) > 1e-3  # the other normaliser would be told apart


def test_rloo_with_zero_variance_groups_dropped(stored_rollouts):
    rows = read_rollout_rows(stored_rollouts)
    rewards = torch.tensor([r.reward for r in rows], dtype=torch.float64)
    group = group_indices([r.prompt_id for r in rows])
    flat = zero_variance_groups(rewards, group)[group]
    assert 0 < int(flat.sum()) < len(rows), "fixture should hold both kinds of group"
    batch = training_batch(rows, "rloo", drop_zero_variance=True)
    assert batch is not None and len(batch.prompts) == int((~flat).sum())
    torch.testing.assert_close(batch.advantages, rloo_advantages(rewards, group)[~flat].float())
    assert batch.responses == [list(r.response_token_ids) for r, f in zip(rows, flat.tolist()) if not f]
    kept_all = training_batch(rows, "rloo", drop_zero_variance=False)
    assert kept_all is not None and len(kept_all.prompts) == len(rows)


def test_round_with_no_signal_is_skipped_not_crashed(tmp_path, stored_rollouts):
    same = [replace(r, reward=1.0) for r in read_rollout_rows(stored_rollouts)]
    assert training_batch(same, "grpo", drop_zero_variance=True) is None
    write_rollouts(tmp_path / "flat.parquet", same, {})
    recipe = load_recipe(QUICKSTART, [f"run_dir={tmp_path / 'run'}", *SMALL, f"train.rollouts={tmp_path / 'flat.parquet'}",
                                      "train.drop_zero_variance_groups=true"])
    final = run_train(recipe)
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert record["responses_trained"] == 0 and record["step"] == 0 and "loss" not in record
    assert record["zero_variance_group_frac"] == 1.0
    before = load_file(DEFAULT_WEIGHTS)
    after = load_file(final / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
