"""The anchor π_old in real training runs: the trainer's own rescoring agrees with a float32
sampler to rounding, splits staleness from mismatch, and a bf16 sampler's copy makes a real
mismatch the correction sees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minpro_cli.config import load_recipe
from minpro_cli.errors import ConfigError
from minpro_cli.train import run_train

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["train.prompts_per_iteration=8", "train.group_size=4", "sampler.options.max_new_tokens=48",
         "train.eval_every=0", "train.checkpoint_every=10"]  # fmt: skip


def train(tmp_path: Path, name: str, *overrides: str) -> tuple[list[dict], dict[str, torch.Tensor]]:
    run = tmp_path / name
    recipe = load_recipe(ROOT / "recipes/quickstart.yaml", [f"run_dir={run}", *SMALL, *overrides])
    run_train(recipe)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return metrics, load_file(str(run / "final" / "model.safetensors"))


def gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_on_policy_float32_sampling_the_recomputed_anchors_are_the_behaviour_policy(tmp_path):
    rounds = ["train.iterations=2"]
    before, behavior = train(tmp_path, "behavior", *rounds)
    assert any(m["grad_norm"] > 0 for m in before), "no round had a reward signal: nothing was compared"
    for anchor in ("sampling_weights", "round_start"):
        metrics, weights = train(tmp_path, anchor, *rounds, f"train.anchor={anchor}", "correction.metrics_only=true",
                                 "correction.level=token", "train.factor_metrics=true")  # fmt: skip
        for m in metrics:
            # per token, the KV-cache decode and the trainer's full forward round apart by ≤ 1e-4
            # in float32 (tests/test_sampler_hf.py); on average by ≤ 1e-6
            assert abs(m["correction/weight_before_bounds_min"] - 1) < 1e-4
            assert abs(m["correction/weight_before_bounds_max"] - 1) < 1e-4
            assert abs(m["correction/weight_before_bounds_mean"] - 1) < 1e-6
            assert abs(m["mismatch/kl_k1"]) < 1e-6 and abs(m["staleness/kl_k1"]) < 1e-6
        assert gap(weights, behavior) < 1e-5, anchor  # the same update up to float rounding


def test_with_staleness_the_sampling_weights_anchor_holds_the_mismatch_alone(tmp_path):
    rounds = ["train.iterations=4", "train.staleness=2", "train.factor_metrics=true", "correction.metrics_only=true",
              "optim.lr=1e-3", "optim.warmup_steps=0",
              "correction.level=token"]
    by_anchor = {}
    for anchor in ("sampling_weights", "round_start"):
        metrics, _ = train(tmp_path, anchor, *rounds, f"train.anchor={anchor}")
        by_anchor[anchor] = metrics
    for m in by_anchor["sampling_weights"]:
        assert abs(m["correction/weight_before_bounds_max"] - 1) < 1e-4  # c = sampling weights / μ ≡ 1
        assert abs(m["mismatch/kl_k1"]) < 1e-6
    late = by_anchor["round_start"][2]  # round 2 samples with round 0's weights, 2 steps behind
    assert late["correction/weight_before_bounds_max"] - late["correction/weight_before_bounds_min"] > 1e-3
    assert late["staleness/kl_k1"] > 1e-5 and abs(late["mismatch/kl_k1"]) < 1e-6
    assert by_anchor["round_start"][0]["correction/weight_before_bounds_max"] == pytest.approx(1, abs=1e-4)


def test_bf16_sampling_makes_a_mismatch_that_the_correction_sees(tmp_path):
    metrics, _ = train(tmp_path, "bf16", "train.iterations=1", "sampler.options.dtype=bfloat16",
                       "train.anchor=sampling_weights", "correction.level=token", "correction.high=1.01")  # fmt: skip
    m = metrics[0]
    assert m["mismatch/log_ppl_abs_diff"] > 1e-4 if "mismatch/log_ppl_abs_diff" in m else True
    assert m["correction/weight_before_bounds_max"] > 1.01 and m["correction/truncated_frac"] > 0
    assert m["correction/weight_after_bounds_max"] <= 1.01 + 1e-9


def test_stored_rollouts_cannot_take_the_sampling_weights_anchor(tmp_path, rollouts_file=None):
    run = tmp_path / "sample"
    recipe = load_recipe(ROOT / "recipes/quickstart.yaml", [f"run_dir={run}", *SMALL, "rollout.num_prompts=4",
                                                            "rollout.group_size=2"])  # fmt: skip
    from minpro_cli.rollout import run_rollout

    path = run_rollout(recipe)
    stored = load_recipe(ROOT / "recipes/quickstart.yaml", [f"run_dir={tmp_path / 'train'}", *SMALL,
                                                            f"train.rollouts={path}", "train.anchor=sampling_weights"])
    with pytest.raises(ConfigError, match="policy_version 0"):
        run_train(stored)
