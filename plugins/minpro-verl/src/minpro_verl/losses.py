"""minpro's objectives behind verl's policy-loss signature, with verl doing the reduction.

verl calls a policy loss as

    loss_fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
        -> (pg_loss, metrics)

The formula is minpro's own objective, not a copy: it runs unchanged, except that its
per-token losses are reduced by verl's `agg_loss` with `config.global_batch_info`, so verl's
global token / sequence normalisation across data-parallel ranks holds, and verl's rollout
correction weights multiply them first. The clip interval is verl's: eps_low is
`clip_ratio_low`, eps_high is `clip_ratio_high` (each falling back to `clip_ratio`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import torch

from minpro_cli.objectives import ObjectiveInputs, ObjectiveOptions
from minpro_cli.objectives.minpro import MinPRO
from minpro_cli.objectives.prefix import PrefixRatio

Aggregate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_aggregate: ContextVar[Aggregate] = ContextVar("minpro_verl_aggregate")
LOSSES: dict[str, type[ObjectiveOptions]] = {"minpro": MinPRO, "prefix": PrefixRatio}


def reduced_by_verl(objective: type[ObjectiveOptions]) -> type[ObjectiveOptions]:
    """The objective with `aggregate` handed to whatever reduction the current call set."""

    def aggregate(self: ObjectiveOptions, per_token: torch.Tensor, mask: torch.Tensor, counts: Any = None) -> torch.Tensor:
        return _aggregate.get()(per_token, mask)  # verl's global counts (global_batch_info), not minpro's `counts`

    return type(f"Verl{objective.__name__}", (objective,), {"aggregate": aggregate, "__module__": __name__})


def clip_options(config: Any) -> dict[str, float]:
    """verl's clip interval: ratios are clipped to [1 − clip_ratio_low, 1 + clip_ratio_high]."""
    default = config.get("clip_ratio", 0.2)
    low, high = config.get("clip_ratio_low"), config.get("clip_ratio_high")
    return {"eps_low": default if low is None else low, "eps_high": default if high is None else high}


def policy_loss(objective: type[ObjectiveOptions], name: str) -> Callable[..., tuple[torch.Tensor, dict[str, Any]]]:
    in_verl = reduced_by_verl(objective)

    def loss_fn(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        from verl.trainer.ppo.core_algos import agg_loss

        assert config is not None, f"verl passes the actor config to policy loss '{name}'"
        batch_info = dict(config.get("global_batch_info", None) or {})

        def reduce(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            if rollout_is_weights is not None:
                per_token = per_token * rollout_is_weights
            return agg_loss(loss_mat=per_token, loss_mask=mask, loss_agg_mode=loss_agg_mode, **batch_info)

        mask = response_mask.bool()
        token = _aggregate.set(reduce)
        try:
            out = in_verl(**clip_options(config))(ObjectiveInputs(log_prob, old_log_prob, advantages, mask))
        finally:
            _aggregate.reset(token)
        log_ratio = (log_prob - old_log_prob).detach()
        metrics = {f"actor/{name}/{key}": float(value) for key, value in out.metrics.items()}
        metrics["actor/pg_clipfrac"] = float(out.metrics.get("clip_frac", 0.0))
        metrics["actor/ppo_kl"] = float(-log_ratio[mask].mean()) if bool(mask.any()) else 0.0
        return out.loss, metrics

    loss_fn.__name__ = f"compute_policy_loss_{name}"
    loss_fn.__doc__ = f"minpro's `{name}` objective as a verl policy loss.\n\n{objective.__doc__}"
    return loss_fn


def register() -> None:
    from verl.trainer.ppo.core_algos import register_policy_loss

    for name, objective in LOSSES.items():
        register_policy_loss(name)(policy_loss(objective, name))
