"""The KL penalty and the entropy bonus of `minpro train`: terms added to the objective's loss.

    loss = objective + kl_coef · agg(k(log π_θ, log π_ref)) − entropy_coef · agg(H(π_θ))

`agg` is the objective's own `loss_agg` over the same trained tokens (and, in `minpro train`,
the same minibatch counts), as in verl's actor. π_ref is the frozen starting model
(`model.path`); with LoRA it is the same model with its adapters switched off, which costs no
memory. Both terms use the responses as sampled (from μ), as verl and TRL do: the KL estimate
is not importance-corrected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from minpro_cli.config import Recipe
from minpro_cli.distributed import World, parallelize, unwrap
from minpro_cli.logprobs import PackedBatch, response_logprobs
from minpro_cli.modeling import Policy, load_policy
from minpro_cli.objectives import Objective, masked_mean
from minpro_cli.objectives.kl import KLEstimator, kl_estimate

ReferenceLogprobs = Callable[[PackedBatch, float], torch.Tensor]  # (batch, temperature) → (B, R) log π_ref


@dataclass(frozen=True)
class Penalties:
    kl_coef: float = 0.0
    kl_estimator: KLEstimator = "k3"
    entropy_coef: float = 0.0
    reference: ReferenceLogprobs | None = None  # required when kl_coef > 0

    def __call__(
        self,
        objective: Objective,
        logprobs: torch.Tensor,
        entropy: torch.Tensor,
        batch: PackedBatch,
        temperature: float,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor | float, dict[str, float | torch.Tensor]]:
        """The terms to add to the objective's loss, and their metrics (`kl_ref`: the mean
        per-token estimate). `entropy` must carry its gradient when `entropy_coef` is set."""
        term: torch.Tensor | float = 0.0
        metrics: dict[str, float | torch.Tensor] = {}
        if self.kl_coef:
            assert self.reference is not None, "a KL penalty needs a reference model"
            with torch.no_grad():
                reference = self.reference(batch, temperature)
            kl = kl_estimate(logprobs, reference, self.kl_estimator)
            term = term + self.kl_coef * objective.aggregate(kl, mask)
            metrics["kl_ref"] = masked_mean(kl, mask)
        if self.entropy_coef:
            term = term - self.entropy_coef * objective.aggregate(entropy, mask)
        return term, metrics


NO_PENALTIES = Penalties()


def penalties_of(recipe: Recipe, policy: Policy, module: torch.nn.Module, world: World) -> Penalties:
    """The recipe's penalties; the reference model is loaded only for a KL penalty. `module` is
    what trains (the policy's model, possibly wrapped)."""
    cfg = recipe.train
    reference = reference_logprobs(recipe, policy, module, world) if cfg.kl_coef else None
    return Penalties(cfg.kl_coef, cfg.kl_estimator, cfg.entropy_coef, reference)


def reference_logprobs(recipe: Recipe, policy: Policy, module: torch.nn.Module, world: World) -> ReferenceLogprobs:
    """log π_ref: the policy with its LoRA adapters off, else a frozen copy of `model.path`
    (sharded like the policy under FSDP2)."""
    if policy.adapters is not None:
        adapters, model = policy.adapters, unwrap(module)

        def with_adapters_off(batch: PackedBatch, temperature: float) -> torch.Tensor:
            with adapters.disabled():
                return response_logprobs(model, batch, temperature)[0]

        return with_adapters_off
    m = recipe.model
    frozen = load_policy(m.path, m.dtype, m.trust_remote_code, m.device).model.requires_grad_(False).eval()
    sharded = world.size > 1 and recipe.distributed.strategy == "fsdp"
    frozen = parallelize(frozen, "fsdp", world) if sharded else frozen

    def from_frozen_copy(batch: PackedBatch, temperature: float) -> torch.Tensor:
        return response_logprobs(frozen, batch, temperature)[0]

    return from_frozen_copy
