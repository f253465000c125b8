"""minpro's correction layer against verl's and TRL's own code on the same tensors.

    python3 -m venv /tmp/xc && /tmp/xc/bin/pip install torch==2.13.0 trl==1.16.0 tensordict
    /tmp/xc/bin/pip install --no-deps verl==0.9.1
    PYTHONPATH=src /tmp/xc/bin/python scripts/crosscheck_correction.py

verl: `verl/trainer/ppo/rollout_corr_helper.py` (`compute_rollout_correction_weights`,
`compute_rollout_rejection_mask`), loaded from the installed package with its heavy imports
(ray, the DataProto protocol, config dataclasses this module only names in type hints)
replaced by empty stand-ins; `verl.utils.torch_functional` is the real one. TRL: the vLLM
importance-sampling block of `GRPOTrainer._generate_and_score_completions`, taken from the
installed source and run as is, and `GRPOTrainer.get_off_policy_mask`. Not part of the test
suite: the suite never installs verl or TRL.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import sys
import textwrap
import types
from pathlib import Path

import torch

from minpro_cli.correction import CorrectionConfig, Rejection, correct


def load_verl_helper() -> types.ModuleType:
    root = Path(importlib.util.find_spec("verl").submodule_search_locations[0])  # type: ignore[union-attr, index]
    for name in ("verl", "verl.utils", "verl.trainer", "verl.trainer.ppo", "verl.trainer.config", "verl.workers",
                 "verl.workers.config"):
        module = types.ModuleType(name)
        module.__path__ = [str(root.joinpath(*name.split(".")[1:]))]  # packages without running their __init__
        sys.modules[name] = module
    for name, attrs in {"verl.protocol": ["DataProto"], "verl.trainer.config.algorithm": ["RolloutCorrectionConfig"],
                        "verl.workers.config.actor": ["PolicyLossConfig"]}.items():  # fmt: skip
        module = types.ModuleType(name)
        for attr in attrs:
            setattr(module, attr, type(attr, (), {}))
        sys.modules[name] = module
    spec = importlib.util.spec_from_file_location("rollout_corr_helper", root / "trainer/ppo/rollout_corr_helper.py")
    helper = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(helper)  # type: ignore[union-attr]
    return helper


def trl_is_ratio(old: torch.Tensor, sampling: torch.Tensor, mask: torch.Tensor, mode: str, low, high) -> torch.Tensor:
    """TRL's own block, cut from the installed `_generate_and_score_completions` and run."""
    from trl import GRPOTrainer

    source = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    start = source.index("per_token_logps_diff = (old_per_token_logps")
    end = source.index("else:\n", source.index("invalid_mis_mask, value=0.0"))
    block = textwrap.dedent(source[source.rindex("\n", 0, start) + 1 : end])
    fake = types.SimpleNamespace(vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=low,
                                 vllm_importance_sampling_clip_max=high)  # fmt: skip
    scope = {"self": fake, "torch": torch, "math": math, "old_per_token_logps": old,
             "sampling_per_token_logps": sampling, "mask": mask.to(old.dtype)}  # fmt: skip
    exec(block, scope)  # noqa: S102 (TRL's own code, from the installed package)
    return scope["vllm_importance_sampling_ratio"].expand_as(old)


def tensors(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([9, 1, 14, 5, 11, 3, 7, 12])
    width = 16
    behavior = -3 * torch.rand(len(lengths), width, generator=gen, dtype=torch.float64)
    anchor = behavior + 0.2 * torch.randn(behavior.shape, generator=gen, dtype=torch.float64)
    current = anchor + 0.1 * torch.randn(behavior.shape, generator=gen, dtype=torch.float64)
    mask = torch.arange(width)[None] < lengths[:, None]
    advantages = torch.randn(len(lengths), generator=gen, dtype=torch.float64)
    return anchor, behavior, current, advantages, mask


def compare(name: str, ours: torch.Tensor, theirs: torch.Tensor, mask: torch.Tensor) -> float:
    gap = float((ours.double() - theirs.double())[mask].abs().max())
    changed = float((ours.double() - 1)[mask].abs().max())
    status = "ok" if gap <= 1e-12 and changed > 0 else "DIFFERS"
    print(f"{status:8s} {name:58s} max |minpro − theirs| = {gap:.1e} (weights move up to {changed:.2f})")
    return gap if changed > 0 else math.inf


def main() -> None:
    helper = load_verl_helper()
    anchor, behavior, current, advantages, mask = tensors()
    log_ratio = anchor - behavior
    worst = 0.0
    verl_is = [("token", 2.0, CorrectionConfig(level="token", high=1.1)), ("token", "0.85_1.15", None),
               ("sequence", 1.5, CorrectionConfig(level="sequence", high=1.5)), ("sequence", "0.5_2.0", None)]  # fmt: skip
    for level, threshold, cfg in verl_is:
        if cfg is None:
            low, high = (float(x) for x in str(threshold).split("_"))
            cfg = CorrectionConfig(level=level, action="mask", low=low, high=high)
        elif level == "token":
            threshold = cfg.high
        weights, _ = helper.compute_rollout_correction_weights(log_ratio, mask.double(), level, threshold)
        ours = correct(cfg, anchor, behavior, current, advantages, mask).weights
        worst = max(worst, compare(f"verl rollout_is={level}, threshold={threshold}", ours, weights, mask))
    rules = {"token_k1": ("0.85_1.15", Rejection(kl="k1", agg="token", low=math.log(0.85), high=math.log(1.15))),
             "token_k2": (0.02, Rejection(kl="k2", agg="token", high=0.02)),
             "token_k3": (0.02, Rejection(kl="k3", agg="token", high=0.02)),
             "seq_sum_k1": ("0.8_1.2", Rejection(kl="k1", agg="sum", low=math.log(0.8), high=math.log(1.2))),
             "seq_sum_k2": (0.2, Rejection(kl="k2", agg="sum", high=0.2)),
             "seq_sum_k3": (0.2, Rejection(kl="k3", agg="sum", high=0.2)),
             "seq_mean_k1": ("0.97_1.03", Rejection(kl="k1", agg="mean", low=math.log(0.97), high=math.log(1.03))),
             "seq_mean_k2": (0.02, Rejection(kl="k2", agg="mean", high=0.02)),
             "seq_mean_k3": (0.02, Rejection(kl="k3", agg="mean", high=0.02)),
             "seq_max_k2": (0.05, Rejection(kl="k2", agg="max", high=0.05)),
             "seq_max_k3": (0.05, Rejection(kl="k3", agg="max", high=0.05))}  # fmt: skip
    for option, (threshold, rule) in rules.items():
        kept, _ = helper.compute_rollout_rejection_mask(log_ratio, mask.double(), option, threshold)
        ours = correct(CorrectionConfig(reject=[rule]), anchor, behavior, current, advantages, mask).weights
        worst = max(worst, compare(f"verl rollout_rs={option}, threshold={threshold}", ours, kept, mask))
    for mode, low, high, cfg in [
        ("token_truncate", None, 1.1, CorrectionConfig(level="token", high=1.1)),
        ("token_truncate", 0.9, 1.1, CorrectionConfig(level="token", low=0.9, high=1.1)),
        ("token_mask", 0.85, 1.15, CorrectionConfig(level="token", action="mask", low=0.85, high=1.15)),
        ("sequence_truncate", None, 1.5, CorrectionConfig(level="sequence", high=1.5)),
        ("sequence_mask", None, 3.0, CorrectionConfig(level="sequence", action="mask", high=3.0)),  # TRL's default
        ("sequence_mask", 0.5, 2.0, CorrectionConfig(level="sequence", action="mask", low=0.5, high=2.0)),
    ]:
        theirs = trl_is_ratio(anchor, behavior, mask, mode, low, high)
        ours = correct(cfg, anchor, behavior, current, advantages, mask).weights
        worst = max(worst, compare(f"TRL vllm_importance_sampling_mode={mode} [{low}, {high}]", ours, theirs, mask))
    from trl import GRPOTrainer

    keep = GRPOTrainer.get_off_policy_mask(advantages[:, None], current, behavior, mask.double(), 0.01)
    ours = correct(CorrectionConfig(opsm_delta=0.01), anchor, behavior, current, advantages, mask).weights
    worst = max(worst, compare("TRL get_off_policy_mask (OPSM), δ = 0.01", ours, keep.expand_as(ours), mask))
    print(f"\nworst gap {worst:.1e}")
    sys.exit(0 if worst <= 1e-12 else 1)


if __name__ == "__main__":
    main()
