"""`minpro train --resume auto|never|PATH`: a run continues only with the recipe that trained
its weights; `never` starts only new runs; a checkpoint path replays the run from there."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from minpro_cli.cli import app
from minpro_cli.config import load_recipe
from minpro_cli.errors import CheckpointError, RunDirError
from minpro_cli.resume import recipe_changes
from minpro_cli.rollout import run_rollout
from minpro_cli.train import run_train

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
TINY = [
    "rollout.num_prompts=4", "rollout.group_size=4", "sampler.options.max_new_tokens=24",
    "train.prompts_per_iteration=4", "train.group_size=4", "train.checkpoint_every=1", "train.keep_checkpoints=3",
    "train.staleness=1", "optim.warmup_steps=0", "optim.lr=1e-3",
]  # fmt: skip


def recipe(run_dir: Path, *overrides: str):
    return load_recipe(QUICKSTART, [f"run_dir={run_dir}", *TINY, *overrides])


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 3-round run with a checkpoint after every round."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run_train(recipe(run_dir, "train.iterations=3"))
    return run_dir


def rounds(run_dir: Path) -> list[int]:
    return [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    return sorted(wa) == sorted(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_which_keys_a_resumed_run_may_change():
    stored = {"run_dir": "a", "train": {"iterations": 3, "staleness": 1, "eval_every": 0}, "objective": {"name": "minpro"}}
    now = {"run_dir": "b", "train": {"iterations": 9, "staleness": 4, "eval_every": 2}, "objective": {"name": "grpo"}}
    assert recipe_changes(stored, now) == ["objective.name", "train.staleness"]


def test_a_finished_run_continues_only_with_its_own_recipe(tmp_path, finished):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    config = (run_dir / "config.yaml").read_text()
    stored = run_rollout(recipe(tmp_path / "sampled"))
    with pytest.raises(RunDirError, match=r"run was trained with another recipe \(train.rollouts: None → '.*rollouts.parquet'"):
        run_train(recipe(run_dir, "train.iterations=3", f"train.rollouts={stored}"))  # the README's stored-rollouts command
    with pytest.raises(RunDirError, match=r"\(optim.lr: 0.001 → 0.002; train.staleness: 1 → 2\)"):
        run_train(recipe(run_dir, "train.iterations=3", "optim.lr=2e-3", "train.staleness=2"))
    assert (run_dir / "config.yaml").read_text() == config  # nothing was overwritten
    # longer, and evaluated: the same run continued
    run_train(recipe(run_dir, "train.iterations=4", "train.eval_every=4", "eval.max_problems=2", "eval.n_samples=1",
                     "eval.k=[1]"))
    assert rounds(run_dir) == [0, 1, 2, 3]


def test_resume_never_starts_only_new_runs(tmp_path, finished):
    result = CliRunner().invoke(app, ["train", str(QUICKSTART), f"run_dir={finished}", *TINY, "--resume", "never"])
    assert result.exit_code == 2 and "already holds a run and --resume never" in result.output, result.output
    run_train(recipe(tmp_path / "new", "train.iterations=3"), resume="never")
    assert same_weights(tmp_path / "new", finished)  # a new run, the same seed: the same weights


def test_resume_from_an_earlier_checkpoint_replays_the_later_rounds(tmp_path, finished):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    (run_dir / "final" / "model.safetensors").unlink()  # must be rewritten, not kept
    run_train(recipe(run_dir, "train.iterations=3"), resume=str(run_dir / "checkpoints" / "round_00001"))
    assert rounds(run_dir) == [0, 1, 2]  # rounds after the checkpoint redone, none twice
    assert same_weights(run_dir, finished)  # rounds are replayed exactly
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round_00001", "round_00002", "round_00003"]


def test_another_runs_checkpoint_starts_a_new_directory_only(tmp_path, finished):
    checkpoint = str(finished / "checkpoints" / "round_00002")
    elsewhere = shutil.copytree(checkpoint, tmp_path / "elsewhere" / "round_00002")
    with pytest.raises(RunDirError, match="another run's checkpoint and .* already holds a run"):
        run_train(recipe(finished, "train.iterations=3"), resume=str(elsewhere))
    with pytest.raises(CheckpointError, match="not a complete training checkpoint"):
        run_train(recipe(tmp_path / "fork", "train.iterations=3"), resume=str(finished / "final"))
    run_train(recipe(tmp_path / "fork", "train.iterations=3"), resume=checkpoint)
    assert rounds(tmp_path / "fork") == [2]  # it starts after round 1, where the checkpoint stands
    assert same_weights(tmp_path / "fork", finished)


def test_sgd_with_momentum_trains_and_resumes_exactly(tmp_path):
    """optim.name=sgd (for runs without AdamW's per-coordinate normalisation): its momentum buffers
    are checkpointed, so a run resumed from round 1 ends with the uninterrupted run's weights."""
    sgd = ["train.iterations=3", "optim.name=sgd", "optim.momentum=0.9", "optim.lr=0.05",
           "train.entropy_coef=0.1"]  # a gradient even when every reward is equal
    run_train(recipe(tmp_path / "a", *sgd))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    run_train(recipe(tmp_path / "b", *sgd), resume=str(tmp_path / "b" / "checkpoints" / "round_00001"))
    assert same_weights(tmp_path / "a", tmp_path / "b")
    (group,) = json.loads((tmp_path / "a" / "checkpoints" / "round_00003" / "optimizer_param_groups.json").read_text())
    assert group["momentum"] == 0.9 and "betas" not in group  # SGD's settings, not AdamW's
    base = load_file(QUICKSTART.parents[1] / "src/minpro_cli/assets/default_model/model.safetensors")
    final = load_file(tmp_path / "a" / "final" / "model.safetensors")
    assert any(not torch.equal(final[k], base[k]) for k in final)  # it trained
