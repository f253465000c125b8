"""Copies made only to sample are held in the sampler's own precision (`weights_dtype`): the
stale-weight copy, the LoRA/FSDP2 plain copy and, when nothing rescores with them, the
staleness snapshots. What the sampler draws does not change, bit for bit."""

from __future__ import annotations

import copy
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from minpro_cli import modeling
from minpro_cli.config import load_recipe
from minpro_cli.train import Trainer, run_train

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
SMALL = ["sampler.options.max_new_tokens=24", "train.prompts_per_iteration=4", "train.group_size=4",
         "train.iterations=3", "train.checkpoint_every=1", "train.keep_checkpoints=3", "train.staleness=2",
         "sampler.options.dtype=bfloat16"]  # fmt: skip


def test_a_copy_in_a_dtype_is_deepcopy_then_cast(policy):
    ours = policy.copy(torch.bfloat16).model
    reference = copy.deepcopy(policy.model).to(torch.bfloat16)
    assert {k: v.dtype for k, v in ours.state_dict().items()} == {k: v.dtype for k, v in reference.state_dict().items()}
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), reference.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(ours.buffers(), reference.buffers()))
    assert ours.get_output_embeddings().weight is ours.get_input_embeddings().weight  # still tied
    assert next(policy.model.parameters()).dtype == torch.float32  # the original untouched
    plain = policy.copy().model
    assert all(v.dtype == torch.float32 for v in plain.state_dict().values())


def test_stale_sampling_in_the_samplers_dtype_draws_the_same_tokens(tmp_path, monkeypatch):
    """Staleness 2, a bf16 sampler: with the stale copy and snapshots held in bf16, the rollouts
    equal those of float32 copies (the sampler casts them to bf16 anyway); the snapshots in
    the checkpoint are bf16, float32 again when an anchor rescores with them."""
    run_train(load_recipe(QUICKSTART, [f"run_dir={tmp_path / 'bf16'}", *SMALL]))
    real_copy, real_weights = modeling.Policy.copy, Trainer.sampling_weights  # float32 copies and snapshots:
    monkeypatch.setattr(modeling.Policy, "copy", lambda self, dtype=None: real_copy(self))
    monkeypatch.setattr(Trainer, "sampling_weights", lambda self, dtype=None: real_weights(self))
    run_train(load_recipe(QUICKSTART, [f"run_dir={tmp_path / 'fp32'}", *SMALL]))
    for r in range(3):
        name = f"rollouts/round_{r:05d}.parquet"
        bf16, fp32 = pq.read_table(tmp_path / "bf16" / name), pq.read_table(tmp_path / "fp32" / name)
        assert bf16.drop(["model_fingerprint"]).equals(fp32.drop(["model_fingerprint"])), r
    snapshots = load_file(str(tmp_path / "bf16" / "checkpoints" / "round_00002" / "snapshot_round_00001.safetensors"))
    assert {v.dtype for v in snapshots.values()} == {torch.bfloat16}
    monkeypatch.undo()
    # a dedicated sampler process holds its model in bf16 alone, gets bf16 weights, and draws the same rows
    run_train(load_recipe(QUICKSTART, [f"run_dir={tmp_path / 'dedicated'}", *SMALL, "sampler.options.placement=dedicated",
                                       f"sampler.options.threads={torch.get_num_threads()}"]))  # fmt: skip
    for r in range(3):
        name = f"rollouts/round_{r:05d}.parquet"
        assert pq.read_table(tmp_path / "bf16" / name).equals(pq.read_table(tmp_path / "dedicated" / name)), r
    run_train(load_recipe(QUICKSTART, [f"run_dir={tmp_path / 'anchored'}", *SMALL, "train.anchor=sampling_weights"]))
    snapshots = load_file(str(tmp_path / "anchored" / "checkpoints" / "round_00002" / "snapshot_round_00001.safetensors"))
    assert {v.dtype for v in snapshots.values()} == {torch.float32}


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_snapshot_weights_are_copies(policy, dtype):
    from minpro_cli.distributed import SINGLE, full_state_dict

    weights = full_state_dict(policy.model, SINGLE, dtype)
    first = next(iter(policy.model.parameters()))
    name = next(k for k, v in policy.model.state_dict().items() if v.data_ptr() == first.data_ptr())
    assert weights[name].data_ptr() != first.data_ptr()
    assert weights[name].dtype == (dtype or torch.float32)
