"""The anchor π_old of the objective's ratio (`train.anchor`, docs/correction.md): which one a run
uses, the trainer's own no-grad log-probs under given weights (`Rescorer`), and A-3PO's
log-linear approximation that needs no forward."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from minpro_cli.checkpoints import StateDict
from minpro_cli.correction import CorrectionConfig
from minpro_cli.distributed import SINGLE, World
from minpro_cli.logprobs import micro_batches, pack, response_logprobs
from minpro_cli.modeling import Policy
from minpro_cli.sections import Anchor


@dataclass(frozen=True)
class OffPolicy:
    """Which π_old the objective's ratio is taken against (`train.anchor`) and how the
    behaviour factor π_old/μ is corrected (`correction`); docs/correction.md."""

    anchor: Anchor = "behavior"
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)
    factor_metrics: bool = False

    def needs(self) -> set[str]:
        """The recomputed scores an update needs: for the anchor, and for the factor metrics."""
        needed = {self.anchor} & {"sampling_weights", "round_start"}
        return needed | ({"sampling_weights", "round_start"} if self.factor_metrics else set())


BEHAVIOR = OffPolicy()


def loglinear_anchor(current: torch.Tensor, behavior: torch.Tensor, versions: torch.Tensor, proximal: int,
                     version: int) -> torch.Tensor:  # fmt: skip
    """AReaL's A-3PO proximal policy without a forward: log-linear in the policy version between
    μ (version v_μ per token) and π_θ (v_θ, the version this step produces), at v_prox = the
    round's starting version:

        log π_prox ≈ log μ + α (log π_θ − log μ),   α = clamp((v_prox − v_μ) / (v_θ − v_μ), 0, 1)

    (α = 0 where v_θ ≤ v_μ). On-policy α = 0 and π_prox = μ: exactly the round's start when the
    sampler is the trainer, never under a sampler mismatch. Otherwise exact only where log π moves
    linearly with the version."""
    v_mu = versions.to(current.dtype)
    span = version - v_mu
    alpha = torch.where(span > 0, ((proximal - v_mu) / span.clamp(min=1)).clamp(0.0, 1.0), 0.0)
    return behavior + alpha * (current.detach() - behavior)




class Rescorer:
    """The trainer's own no-grad log-probs of responses under weights it is given: a plain copy
    of the policy (no DDP/FSDP2 wrapping, no adapters: the weights come merged) computing in the
    trainer's precision, through the chunked head, in micro-batches of the trainer's token
    budget. Each rank scores its share of the rows and every rank receives all of them."""

    def __init__(self, policy: Policy, micro_batch_tokens: int | None, world: World = SINGLE) -> None:
        self.policy, self.budget, self.world = policy.copy(), micro_batch_tokens, world

    @torch.no_grad()
    def score(self, weights: StateDict, prompts: list[list[int]], responses: list[list[int]],
              temperature: float) -> list[list[float]]:  # fmt: skip
        model = self.policy.model
        model.load_state_dict(weights)
        model.eval()
        mine = self.world.shard(list(range(len(prompts))))
        scored: list[tuple[int, list[float]]] = []
        for micro in micro_batches([len(prompts[i]) for i in mine], [len(responses[i]) for i in mine], self.budget):
            rows = [mine[j] for j in micro]
            packed = pack([prompts[i] for i in rows], [responses[i] for i in rows], self.policy.pad_token_id)
            with self.policy.autocast():
                logprobs, _ = response_logprobs(model, packed, temperature)
            host = logprobs.float().cpu()
            scored += [(i, host[k, : len(responses[i])].tolist()) for k, i in enumerate(rows)]
        return [values for _, values in sorted(self.world.gather(scored))]
