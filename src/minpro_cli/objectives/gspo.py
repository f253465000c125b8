"""GSPO — Group Sequence Policy Optimization (Qwen, arXiv 2507.18071)."""

from __future__ import annotations

from pydantic import Field

from minpro_cli.objectives import LossAgg, ObjectiveInputs, ObjectiveOutput
from minpro_cli.objectives.logratios import log_token_ratio
from minpro_cli.objectives.surrogates import ClippedObjective, ppo_clip_surrogate, ratio_metrics


class GSPO(ClippedObjective):
    """PPO-clip on the length-normalised sequence ratio, in the GSPO-token form.

        s_i     = exp( (1/|o_i|) Σ_t log ρ_{i,t} )                    (geometric mean of ρ)
        s_{i,t} = sg[s_i] · π_θ(o_t | …) / sg[π_θ(o_t | …)]             (value s_i, grad s_i·∇log π_θ)
        L       = (1/G) Σ_i (1/|o_i|) Σ_t max(−Â_{i,t}·s_{i,t}, −Â_{i,t}·clip(s_{i,t}, 1 − ε_low, 1 + ε_high))

    With a per-sequence Â this has exactly the gradient of sequence-level GSPO (TRL's
    `importance_sampling_level="sequence"`); with per-token Â it is GSPO-token. Same as
    verl's `gspo` policy loss. Defaults from the paper: ε_low = 3e-4, ε_high = 4e-4.
    """

    loss_agg: LossAgg = Field("seq-mean-token-mean", description="how per-token losses become one scalar")
    eps_low: float = Field(3e-4, ge=0.0, description="lower clip bound 1 − eps_low")
    eps_high: float = Field(4e-4, ge=0.0, description="upper clip bound 1 + eps_high")

    def __call__(self, inputs: ObjectiveInputs) -> ObjectiveOutput:
        mask = inputs.response_mask.bool()
        log_rho = log_token_ratio(inputs.logprobs, inputs.anchor_logprobs)
        maskf = mask.to(log_rho.dtype)
        log_seq = (log_rho.detach() * maskf).sum(-1) / maskf.sum(-1).clamp(min=1.0)  # (B,), |·| ≤ 20
        # value log s_i, gradient ∇log π_θ(o_t); sg[log π] added last so the value stays exact
        log_seq_token = inputs.logprobs - inputs.logprobs.detach() + log_seq.unsqueeze(-1)
        per_token, clipping = ppo_clip_surrogate(
            log_seq_token.exp(), inputs.token_advantages(), self.clip_low, self.clip_high
        )
        rows = mask.any(-1)
        metrics = {
            **ratio_metrics(log_rho, mask),
            **ratio_metrics(log_seq, rows, "seq_ratio"),
            **clipping.metrics(mask),
        }
        return ObjectiveOutput(loss=self.aggregate(per_token, mask, inputs.counts), metrics=metrics)
