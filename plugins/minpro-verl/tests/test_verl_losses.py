"""`minpro` and `prefix` called through verl's own policy-loss entry point, on CPU tensors,
against minpro's objectives. Runs where verl is installed (scripts/setup_verl_env.sh makes a
scratch .venv-verl); skipped elsewhere."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from minpro_cli.objectives import ObjectiveInputs
from minpro_cli.objectives.minpro import MinPRO
from minpro_cli.objectives.prefix import PrefixRatio

pytestmark = pytest.mark.skipif(importlib.util.find_spec("verl") is None, reason="verl is not installed (opt-in)")
if importlib.util.find_spec("verl") is not None:
    import verl
    from verl.trainer.ppo.core_algos import get_policy_loss_fn
    from verl.workers.config import FSDPActorConfig

OBJECTIVES = {"minpro": MinPRO, "prefix": PrefixRatio}


def config(**fields) -> FSDPActorConfig:
    return FSDPActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=1, **fields)


def batch(seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([6, 2, 9, 4, 9, 1])
    mask = torch.arange(9).unsqueeze(0) < lengths.unsqueeze(1)
    old = -torch.rand(6, 9, generator=generator) * 3
    new = (old + 0.4 * torch.randn(6, 9, generator=generator)).requires_grad_()
    advantages = torch.randn(6, generator=generator).unsqueeze(1).expand(6, 9).contiguous()  # verl: per token
    return old, new, advantages, mask


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
@pytest.mark.parametrize("loss_agg_mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("clip", [{"clip_ratio_low": 1.0, "clip_ratio_high": 0.2}, {"clip_ratio": 0.2}])
def test_verl_entry_point_matches_minpro_objective(name, loss_agg_mode, clip):
    old, new, advantages, mask = batch()
    verl_loss, metrics = get_policy_loss_fn(name)(
        old_log_prob=old, log_prob=new, advantages=advantages, response_mask=mask.float(),
        loss_agg_mode=loss_agg_mode, config=config(**clip),
    )  # fmt: skip
    (verl_grad,) = torch.autograd.grad(verl_loss, new)
    low = clip.get("clip_ratio_low", clip.get("clip_ratio"))
    high = clip.get("clip_ratio_high", clip.get("clip_ratio"))
    objective = OBJECTIVES[name](eps_low=low, eps_high=high, loss_agg=loss_agg_mode)
    ours = objective(ObjectiveInputs(new, old, advantages, mask))
    (our_grad,) = torch.autograd.grad(ours.loss, new)
    torch.testing.assert_close(verl_loss, ours.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(verl_grad, our_grad, rtol=1e-6, atol=1e-8)
    assert metrics["actor/pg_clipfrac"] == ours.metrics["clip_frac"]
    assert metrics[f"actor/{name}/weight_mean"] == pytest.approx(ours.metrics["weight_mean"])


def test_rollout_correction_weights_multiply_each_token():
    old, new, advantages, mask = batch(1)
    weights = torch.rand(6, 9, generator=torch.Generator().manual_seed(2)) + 0.5
    weighted, _ = get_policy_loss_fn("minpro")(old, new, advantages, mask.float(), "token-mean", config(),
                                               rollout_is_weights=weights)
    # minpro's per-token loss at these inputs: the weight does not depend on the advantage, so the
    # loss is linear in it; a per-token advantage of Â·w gives the weighted loss
    ours = MinPRO(eps_low=0.2, eps_high=0.2)(ObjectiveInputs(new, old, advantages * weights, mask))
    torch.testing.assert_close(weighted, ours.loss, rtol=1e-6, atol=1e-7)


def test_global_batch_normalisation_across_data_parallel_ranks():
    """Two ranks with verl's global_batch_info: the mean of their losses (what gradient
    averaging makes of them) is the loss one rank computes on the whole batch."""
    old, new, advantages, mask = batch(3)
    fn = get_policy_loss_fn("minpro")
    whole, _ = fn(old, new, advantages, mask.float(), "token-mean", config())
    tokens = int(mask.sum())
    halves = []
    for rows in (slice(0, 3), slice(3, 6)):
        cfg = config()
        cfg.global_batch_info.update(dp_size=2, batch_num_tokens=tokens, global_batch_size=6)
        loss, _ = fn(old[rows], new[rows], advantages[rows], mask[rows].float(), "token-mean", cfg)
        halves.append(loss)
    torch.testing.assert_close((halves[0] + halves[1]) / 2, whole, rtol=1e-6, atol=1e-7)
    assert abs(float(halves[0].detach()) / 2 - float(whole.detach())) > 1e-4  # one half alone is not the whole


def test_the_documented_qwen3_command_composes_against_verl_config():
    """Every override in docs/verl.md's launch command is a key of verl's ppo_trainer config."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    doc = Path(__file__).resolve().parents[3] / "docs" / "verl.md"
    block = doc.read_text().split("python3 -m verl.trainer.main_ppo \\")[1].split("```")[0]
    overrides = [t.replace("$DATA", "/data").replace("$MODELS", "/models") for t in block.split() if "=" in t]
    config_dir = Path(verl.__file__).parent / "trainer" / "config"
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        config = compose(config_name="ppo_trainer", overrides=overrides)  # unknown keys raise
    actor = config.actor_rollout_ref.actor
    assert len(overrides) > 25 and actor.policy_loss.loss_mode == "minpro" and actor.clip_ratio_low == 1.0
