"""The micro-batch invariance grid, shared by the one-process test and its torchrun worker.

Each case trains a copy of the embedded model for 3 optimizer steps on one synthetic
minibatch (ragged prompts and responses, ratios off 1, mixed-sign advantages) and returns
the final weights. Cases differ in objective, `loss_agg` and micro-batch budget, and in the
anchor and correction mode (`minpro+<mode>`: a recomputed anchor off μ, so c ≠ 1, with each
correction mode set to bite); the claim under test is that the budget (and the world size)
never changes the weights.
"""

from __future__ import annotations

import copy

import torch

from minpro_cli.anchors import BEHAVIOR, OffPolicy
from minpro_cli.correction import CorrectionConfig, Rejection
from minpro_cli.distributed import SINGLE, World, parallelize
from minpro_cli.logprobs import pack, response_logprobs
from minpro_cli.modeling import Policy, load_policy
from minpro_cli.objectives import Objective
from minpro_cli.registry import load_objective
from minpro_cli.step import RolloutBatch, Trainee, update_step

OBJECTIVES = ["minpro", "grpo", "gspo", "cispo"]
LOSS_AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
BUDGETS = ["whole", "half", "one-row"]
ROWS, STEPS = 8, 3
# SGD's learning rate per precision. These random-token rows are far from anything the model has
# seen, and one small step can lift a token's log-prob by several nats; a negative-advantage token's
# unclipped PPO branch then scales its gradient by that ratio (e^7 ≈ 1e3 after one step at 0.002),
# and the trajectory turns chaotic. float64 stays finite at 0.5 (the invariance is measured at 4e-14
# there); float32 overflowed to NaN on AMD EPYC CPUs (AVX2 and AVX-512 alike), so it takes steps
# small enough that its gradient norm stays bounded (42 → 37 → 17).
LR = {torch.float64: 0.5, torch.float32: 1e-3}
CORRECTIONS = {
    "token": OffPolicy("sampling_weights", CorrectionConfig(level="token", high=1.2)),
    "sequence_mask": OffPolicy("sampling_weights", CorrectionConfig(level="sequence", action="mask", low=0.3, high=3)),
    "geometric_mask": OffPolicy("sampling_weights", CorrectionConfig(level="geometric", action="mask", low=0.9, high=1.1)),
    "prefix_min": OffPolicy("sampling_weights", CorrectionConfig(level="prefix_min", high=1.5)),
    "prefix": OffPolicy("round_start", CorrectionConfig(level="prefix", low=0.2, high=3.0)),
    "reject": OffPolicy("sampling_weights", CorrectionConfig(reject=[Rejection(kl="k3", agg="max", high=0.1),
                                                                     Rejection(kl="k1", agg="token", low=-0.3, high=0.3)])),
    "veto_opsm": OffPolicy("sampling_weights", CorrectionConfig(veto_low=0.6, opsm_delta=0.02)),
    "loglinear": OffPolicy("loglinear", CorrectionConfig(level="token", high=1.3)),
}


def synthetic_minibatch(policy: Policy, dtype: torch.dtype) -> RolloutBatch:
    """Ragged rows whose behaviour log-probs are the model's own plus noise (ratios ≠ 1)."""
    gen = torch.Generator().manual_seed(0)
    vocab = policy.model.config.vocab_size
    prompts = [torch.randint(3, vocab, (int(n),), generator=gen).tolist() for n in torch.randint(2, 9, (ROWS,), generator=gen)]
    responses = [torch.randint(3, vocab, (int(n),), generator=gen).tolist() for n in torch.randint(1, 12, (ROWS,), generator=gen)]
    model = policy.model.to(dtype)
    with torch.no_grad():
        current, _ = response_logprobs(model, pack(prompts, responses, policy.pad_token_id))
    noise = 0.3 * torch.randn(current.shape, generator=gen, dtype=current.dtype)
    old = [(current[i, : len(r)] + noise[i, : len(r)]).tolist() for i, r in enumerate(responses)]
    advantages = torch.randn(ROWS, generator=gen, dtype=dtype)
    anchor = {key: [(current[i, : len(r)] + scale * torch.randn(len(r), generator=gen, dtype=current.dtype)).tolist()
                    for i, r in enumerate(responses)] for key, scale in (("sampling_weights", 0.2), ("round_start", 0.25))}
    # each row's version per token; every other row switches to a newer version mid-way (a partial rollout)
    versions = [[v] * (len(r) // 2) + [v + i % 2] * (len(r) - len(r) // 2)
                for i, (v, r) in enumerate(zip(torch.randint(0, 3, (ROWS,), generator=gen).tolist(), responses))]
    return RolloutBatch(prompts, responses, old, advantages, temperature=1.0, versions=versions, scores=anchor,
                        trained_from=2)


def budget_tokens(batch: RolloutBatch, budget: str) -> int:
    whole = ROWS * (max(map(len, batch.prompts)) + max(map(len, batch.responses)))
    return {"whole": whole, "half": whole // 2, "one-row": 1}[budget]


def train_case(
    base: Policy, batch: RolloutBatch, objective: Objective, budget: int, world: World = SINGLE,
    off_policy: OffPolicy = BEHAVIOR,
) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(base.model)
    module = parallelize(model, "ddp", world)
    trainee = Trainee(module, base.pad_token_id, world, torch.float32, budget)
    # plain SGD without clipping: the step is linear in the gradient, so a wrong constant in
    # the normaliser shows (AdamW and clipping would divide it out)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR[next(model.parameters()).dtype])
    for step in range(STEPS):
        update_step(trainee, optimizer, objective, batch, grad_clip=1e9, off_policy=off_policy, version=3 + step)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def cases(dtype: torch.dtype = torch.float64) -> list[tuple[str, str, str]]:
    """Every objective × loss_agg × budget; the correction modes in float64 only, whole
    minibatch against one row per micro-batch (their weights are row-local: the cut that
    separates rows most is the one that could break them)."""
    plain = [(o, a, b) for o in OBJECTIVES for a in LOSS_AGGS for b in BUDGETS]
    if dtype != torch.float64:
        return plain
    return plain + [(f"minpro+{mode}", "token-mean", b) for mode in CORRECTIONS for b in ("whole", "one-row")]


def run_grid(dtype: torch.dtype, world: World = SINGLE) -> dict[str, torch.Tensor]:
    """Final weights of every case, keyed `objective/loss_agg/budget/parameter`."""
    base = load_policy("embedded")
    base.model.to(dtype)
    batch = synthetic_minibatch(base, dtype)
    out = {}
    for name, loss_agg, budget in cases(dtype):
        objective, _, mode = name.partition("+")
        weights = train_case(base, batch, load_objective(objective, loss_agg=loss_agg), budget_tokens(batch, budget),
                             world, CORRECTIONS[mode] if mode else BEHAVIOR)  # fmt: skip
        out |= {f"{name}/{loss_agg}/{budget}/{k}": v for k, v in weights.items()}
    return out
