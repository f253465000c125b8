"""PPO-clip on the token ratio: GRPO (arXiv 2402.03300), DAPO (2503.14476), Dr.GRPO (2503.20783)."""

from __future__ import annotations

from pydantic import Field

from minpro_cli.objectives import LossAgg, ObjectiveInputs, ObjectiveOutput
from minpro_cli.objectives.logratios import log_token_ratio
from minpro_cli.objectives.surrogates import ClippedObjective, ppo_clip_surrogate, ratio_metrics


class GRPO(ClippedObjective):
    """PPO-clip surrogate on the token ratio, sequence-mean of token-means by default.

        ℓ_t = max(−Â_t·ρ_t, −Â_t·clip(ρ_t, 1 − ε_low, 1 + ε_high))
        L   = (1/G) Σ_i (1/|o_i|) Σ_t ℓ_{i,t}

    `dual_clip` = c > 1 bounds the loss of a negative-advantage token: ℓ_t = min(ℓ_t, −Â_t·c)
    for Â_t < 0 (verl's clip_ratio_c). Same as verl's `vanilla` policy loss and TRL's
    `loss_type="grpo"` (TRL's epsilon / epsilon_high are eps_low / eps_high).
    """

    loss_agg: LossAgg = Field("seq-mean-token-mean", description="how per-token losses become one scalar")
    dual_clip: float | None = Field(None, gt=1.0, description="dual-clip constant c for Â < 0 (off by default)")

    def __call__(self, inputs: ObjectiveInputs) -> ObjectiveOutput:
        mask = inputs.response_mask.bool()
        log_rho = log_token_ratio(inputs.logprobs, inputs.anchor_logprobs)
        per_token, clipping = ppo_clip_surrogate(
            log_rho.exp(), inputs.token_advantages(), self.clip_low, self.clip_high, self.dual_clip
        )
        metrics = {**ratio_metrics(log_rho, mask), **clipping.metrics(mask)}
        return ObjectiveOutput(loss=self.aggregate(per_token, mask, inputs.counts), metrics=metrics)


class DAPO(GRPO):
    """GRPO with clip-higher (ε_high = 0.28) and token-mean aggregation.

    DAPO, eq. 8:
        L = Σ_{i,t} max(−Â·ρ_t, −Â·clip(ρ_t, 0.8, 1.28)) / Σ_i |o_i|

    Same as TRL's `loss_type="dapo"`. DAPO's dynamic sampling is the train option
    `drop_zero_variance_groups`.
    """

    loss_agg: LossAgg = Field("token-mean", description="how per-token losses become one scalar")
    eps_high: float = Field(0.28, ge=0.0, description="upper clip bound 1 + eps_high")


class DrGRPO(GRPO):
    """GRPO with a constant loss normaliser and advantages not divided by the group std.

    Dr.GRPO ("GRPO done right") removes both length and difficulty bias; its default
    advantage estimator is `dr_grpo`:
        L = Σ_{i,t} max(−Â·ρ_t, −Â·clip(ρ_t)) / (G · L_max),   Â_i = r_i − mean_group(r)

    Same as TRL's `loss_type="dr_grpo"` (L_max = max_completion_length). `minpro train` sets
    `max_response_length` to the sampler's max_new_tokens when the recipe leaves it unset.
    """

    default_advantage = "dr_grpo"

    loss_agg: LossAgg = Field("seq-mean-token-sum-norm", description="how per-token losses become one scalar")
