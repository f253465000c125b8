"""The training step: a round's rows as a batch with advantages, cut into minibatches and
micro-batches, and one optimizer step of the objective (plus penalties) on each minibatch.

`update_policy` is a function of a trainee (the module forward and backward go through, in a
world of 1 or N ranks), an optimizer, an objective and a batch: no global state and no I/O.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from minpro_cli.advantages import compute_advantages, group_indices, zero_variance_groups
from minpro_cli.anchors import BEHAVIOR, OffPolicy, loglinear_anchor
from minpro_cli.console import progress_bar
from minpro_cli.correction import (
    CorrectionTally,
    FactorTally,
    correct,
    log_behavior_factor,
    scale_gradient,
)
from minpro_cli.distributed import SINGLE, World, combine_metrics, extreme, gradient_sync, reduce_step_metrics
from minpro_cli.errors import PluginError, RolloutFileError, TrainingDivergedError
from minpro_cli.logprobs import autocast, micro_batches, pack, pad_rows, pad_versions, response_logprobs
from minpro_cli.modeling import Policy
from minpro_cli.objectives import (
    AdvantageEstimator,
    MinibatchCounts,
    Objective,
    ObjectiveInputs,
    minibatch_counts,
)
from minpro_cli.objectives.logratios import log_token_ratio
from minpro_cli.penalties import NO_PENALTIES, Penalties
from minpro_cli.ratiostats import StepRatios
from minpro_cli.rollouts import RolloutRow


@dataclass
class RolloutBatch:
    """One round's training data: token ids, behaviour log-probs μ, advantages, the version that
    drew each response token, and the trainer's own recomputed log-probs (`scores`, keyed by the weights
    they were computed under: `sampling_weights`, `round_start`) where `train.anchor` or the
    factor metrics need them. `trained_from` is the version the round's first update starts from."""

    prompts: list[list[int]]
    responses: list[list[int]]
    behavior_logprobs: list[list[float]]
    advantages: torch.Tensor  # (B,)
    temperature: float
    versions: list[list[int]] = field(default_factory=list)  # per response token (behavior_versions); empty: all 0
    scores: dict[str, list[list[float]]] = field(default_factory=dict)
    trained_from: int = 0
    rewards: torch.Tensor | None = None  # (B,) each response's reward, for objectives that split on it

    @classmethod
    def from_rows(cls, rows: list[RolloutRow], advantages: torch.Tensor) -> RolloutBatch:
        temperatures = {round(float(r.temperature), 6) for r in rows}
        if len(temperatures) != 1:
            raise RolloutFileError(f"a training batch mixes sampling temperatures {sorted(temperatures)}")
        return cls(
            prompts=[list(r.prompt_token_ids) for r in rows],
            responses=[list(r.response_token_ids) for r in rows],
            behavior_logprobs=[list(r.behavior_logprobs) for r in rows],
            advantages=advantages,
            temperature=temperatures.pop(),
            versions=[list(r.behavior_versions or []) for r in rows],
            rewards=torch.tensor([float(r.reward) for r in rows]),
        )

    def select(self, index: list[int]) -> RolloutBatch:
        return RolloutBatch(
            prompts=[self.prompts[i] for i in index],
            responses=[self.responses[i] for i in index],
            behavior_logprobs=[self.behavior_logprobs[i] for i in index],
            advantages=self.advantages[index],
            temperature=self.temperature,
            versions=[self.versions[i] for i in index] if self.versions else [],
            scores={key: [rows[i] for i in index] for key, rows in self.scores.items()},
            trained_from=self.trained_from,
            rewards=self.rewards[index] if self.rewards is not None else None,
        )


def training_batch(
    rows: list[RolloutRow], estimator: AdvantageEstimator, drop_zero_variance: bool
) -> RolloutBatch | None:
    """Advantages per response; with `drop_zero_variance`, groups whose rewards are all equal
    are left out (None when nothing is left)."""
    rewards = torch.tensor([float(r.reward) for r in rows], dtype=torch.float64)
    group = group_indices([r.prompt_id for r in rows])
    advantages = compute_advantages(estimator, rewards, group).float()
    if drop_zero_variance:
        keep = ~zero_variance_groups(rewards, group)[group]
        rows = [r for r, k in zip(rows, keep.tolist()) if k]
        advantages = advantages[keep]
    return RolloutBatch.from_rows(rows, advantages) if rows else None


@dataclass
class Trainee:
    """What an update trains: the module forward and backward go through (the model itself,
    or its DDP / FSDP2 wrapping) in its world of ranks, the pad id batches are packed with,
    the compute precision, and the token budget of one forward/backward (None: no split)."""

    module: torch.nn.Module
    pad_token_id: int
    world: World = SINGLE
    compute_dtype: torch.dtype = torch.float32
    micro_batch_tokens: int | None = None

    @classmethod
    def of(cls, policy: Policy, micro_batch_tokens: int | None = None) -> Trainee:
        return cls(policy.model, policy.pad_token_id, SINGLE, policy.compute_dtype, micro_batch_tokens)


def micro_batch_plan(minibatch: RolloutBatch, world: World, budget: int | None) -> tuple[list[list[int]], int]:
    """This rank's micro-batches (row indices into the minibatch) and the number of forward /
    backward passes every rank makes: the most any rank needs (each can tell every share)."""
    rows = list(range(len(minibatch.prompts)))
    plans = []
    for rank in range(world.size):
        share = world.shard_of(rows, rank)
        cut = micro_batches([len(minibatch.prompts[i]) for i in share], [len(minibatch.responses[i]) for i in share], budget)
        plans.append([[share[i] for i in micro] for micro in cut])
    return plans[world.rank], max(len(plan) for plan in plans)


STALENESS_TOKEN_MEAN, STALENESS_OLDEST, STALENESS_NEWEST = "staleness/token_mean", "staleness/oldest", "staleness/newest"
SPANS = "spans"  # versions per response: 1 unless the weights changed mid-response


@dataclass
class StepTally:
    """Metrics of one optimizer step, accumulated over its micro-batches as device tensors and
    read back once per step (no host sync per micro-batch): token-weighted means, extremes,
    and the ratio statistics of every trained token."""

    ratios: StepRatios = field(default_factory=StepRatios)
    objective: list[tuple[dict[str, float | torch.Tensor], torch.Tensor]] = field(default_factory=list)
    entropy_sum: list[torch.Tensor] = field(default_factory=list)
    factors: dict[str, FactorTally] = field(default_factory=dict)  # mismatch, staleness, drift
    correction: CorrectionTally = field(default_factory=CorrectionTally.empty)
    versions: list[torch.Tensor] = field(default_factory=list)  # per micro-batch: age sum, oldest, newest, spans, rows

    def add(
        self, metrics: dict[str, float | torch.Tensor], log_rho: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor
    ) -> None:
        self.objective.append((metrics, mask.sum()))
        self.ratios.add(log_rho, mask)
        self.entropy_sum.append(torch.where(mask, entropy.double(), 0.0).sum())

    def add_versions(self, versions: torch.Tensor, mask: torch.Tensor, current: int) -> None:
        """The age (in optimizer steps) of each trained token: `current`, the version of the weights
        this step updates, minus the version that drew it; and the versions per response."""
        age = (current - versions).double()
        self.versions.append(torch.stack([
            torch.where(mask, age, 0.0).sum(),
            torch.where(mask, age, -math.inf).max(),
            torch.where(mask, age, math.inf).min(),
            (((versions[:, 1:] != versions[:, :-1]) & mask[:, 1:]).sum(-1) + 1)[mask.any(-1)].double().sum(),
            mask.any(-1).double().sum(),
        ]))  # fmt: skip

    def version_tensors(self) -> dict[str, torch.Tensor]:
        """verl's trajectory_staleness and trajectory_spans, per optimizer step: the mean, oldest and
        newest token age, and the mean number of versions that wrote a response."""
        if not self.versions:
            return {}
        parts = torch.stack(self.versions)
        tokens = torch.stack([n for _, n in self.objective]).double().sum()
        return {STALENESS_TOKEN_MEAN: parts[:, 0].sum() / tokens, STALENESS_OLDEST: parts[:, 1].max(),
                STALENESS_NEWEST: parts[:, 2].min(), SPANS: parts[:, 3].sum() / parts[:, 4].sum()}  # fmt: skip

    def metrics(self) -> tuple[dict[str, float], float]:
        """The step's metrics and its trained-token count, from one device-to-host transfer."""
        scalars: list[float | torch.Tensor] = []

        def slot(value: float | torch.Tensor) -> int:  # index of `value` in the one transfer
            scalars.append(value)
            return len(scalars) - 1

        parts = [({key: slot(v) for key, v in m.items()}, slot(n)) for m, n in self.objective]
        tensors = self.ratios.tensors() | self.correction.tensors() | self.version_tensors()
        for name, factor in self.factors.items():
            tensors |= factor.tensors(name)
        ratios = {key: slot(v) for key, v in tensors.items()}
        entropy_sum = slot(torch.stack(self.entropy_sum).sum())
        device = self.entropy_sum[0].device
        host = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in scalars]).tolist()
        tokens = sum(host[n] for _, n in parts)
        return {
            "entropy": host[entropy_sum] / tokens if tokens else math.nan,
            **combine_metrics([({key: host[i] for key, i in m.items()}, host[n]) for m, n in parts]),
            **{key: host[i] for key, i in ratios.items()},
        }, tokens


def update_step(
    trainee: Trainee,
    optimizer: torch.optim.Optimizer,
    objective: Objective,
    minibatch: RolloutBatch,
    grad_clip: float,
    length_budget: int | None = None,
    penalties: Penalties = NO_PENALTIES,
    off_policy: OffPolicy = BEHAVIOR,
    version: int = 0,
) -> dict[str, float]:
    """One optimizer step on one minibatch: this rank's share of it, cut into micro-batches
    within `trainee.micro_batch_tokens`, gradients accumulated, then one step. The loss is the
    objective's plus `penalties` (KL to a reference, entropy bonus).

    Every micro-batch's loss is normalised by the counts of the whole minibatch (all
    micro-batches, all ranks; `length_budget` is Dr.GRPO's L when the objective pins none),
    so the step is the same however the minibatch is cut. `off_policy` picks the objective's anchor
    and corrects the behaviour factor; `version` is the one this step's weights will have (the
    loglinear anchor's v_θ). Every rank runs the same number of
    forward/backward passes (a rank with fewer runs stand-ins that contribute 0), as DDP and
    FSDP2 need. Raises before stepping if the loss or the gradient is not finite.
    """
    module, world = trainee.module, trainee.world
    counts = MinibatchCounts.of_lengths([len(r) for r in minibatch.responses], length_budget)
    mine, passes = micro_batch_plan(minibatch, world, trainee.micro_batch_tokens)
    optimizer.zero_grad(set_to_none=True)
    tally = StepTally()
    loss_sum = torch.zeros((), dtype=torch.float64, device=next(module.parameters()).device)
    with minibatch_counts(counts):  # deprecated hidden counts, for objectives that do not take inputs.counts
        for k in range(passes):
            real = k < len(mine)
            part = minibatch.select(mine[k] if real else [0])
            with gradient_sync(module, k == passes - 1):  # forward and backward: DDP decides at forward
                loss = micro_batch_backward(trainee, objective, part, penalties, tally if real else None,
                                            Scope(counts, off_policy, version))  # fmt: skip
            loss_sum += loss
    global_loss = world.sum([loss_sum.item()])[0]  # every rank sees the same, so all stop together
    if not math.isfinite(global_loss):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingDivergedError(f"loss is {global_loss}")
    grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: a DTensor
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingDivergedError(f"gradient norm is {grad_norm.item()}")
    optimizer.step()
    if not all_finite(module):  # a finite gradient can still make infinite weights (lr = 1e30)
        raise TrainingDivergedError("the optimizer step made non-finite weights")
    metrics, tokens = tally.metrics()
    return {"loss": global_loss, "grad_norm": grad_norm.item(), **reduce_step_metrics(metrics, tokens, world)}


def all_finite(module: torch.nn.Module) -> bool:
    flags = [torch.isfinite(p).all() for p in module.parameters() if p.requires_grad]
    return bool(torch.stack(flags).all()) if flags else True


def check_loss(objective: Objective, loss: object) -> None:
    """An objective plugin returns one scalar loss tensor that carries a gradient."""
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.requires_grad:
        shape = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        grad = "" if not isinstance(loss, torch.Tensor) or loss.requires_grad else " without a gradient"
        raise PluginError(
            f"objective '{getattr(objective, 'name', type(objective).__name__)}' returned a loss of shape {shape}{grad}; "
            "an objective returns one scalar tensor with a gradient (aggregate with its loss_agg): fix the plugin"
        )


@dataclass(frozen=True)
class Scope:
    """What a micro-batch's loss needs from its optimizer step: the minibatch's counts, the
    anchor and correction, and the version the step's weights will have."""

    counts: MinibatchCounts
    off_policy: OffPolicy = BEHAVIOR
    version: int = 0


def anchor_logprobs(scope: Scope, part: RolloutBatch, logprobs: torch.Tensor, behavior: torch.Tensor,
                    versions: torch.Tensor, scores: dict[str, torch.Tensor]) -> torch.Tensor:  # fmt: skip
    """log π_old of every token under `train.anchor` (no grad); `scores`: the part's recomputed
    log-probs, padded like `logprobs`."""
    anchor = scope.off_policy.anchor
    if anchor == "behavior":
        return behavior
    if anchor == "loglinear":
        return loglinear_anchor(logprobs, behavior, versions, part.trained_from, scope.version)
    return scores[anchor]


def tally_factors(tally: StepTally, scores: dict[str, torch.Tensor], logprobs: torch.Tensor, behavior: torch.Tensor,
                  mask: torch.Tensor) -> None:  # fmt: skip
    """mismatch = sampling weights / μ, staleness = round start / sampling weights, drift = π_θ /
    round start: each where the scores it needs were computed."""
    sampling, start = scores.get("sampling_weights"), scores.get("round_start")
    pairs = {"mismatch": (sampling, behavior), "staleness": (start, sampling), "drift": (logprobs, start)}
    for name, (numerator, denominator) in pairs.items():
        if numerator is not None and denominator is not None:
            tally.factors.setdefault(name, FactorTally.empty()).add(
                log_behavior_factor(numerator, denominator, mask), mask
            )


def micro_batch_backward(
    trainee: Trainee, objective: Objective, part: RolloutBatch, penalties: Penalties, tally: StepTally | None,
    scope: Scope,
) -> torch.Tensor:  # fmt: skip
    """Forward and backward of one micro-batch; returns its detached loss (float64). A stand-in
    (`tally` None: this rank has no rows left) contributes a loss and gradient of 0. The
    correction weight W scales each token's gradient into the objective (not the penalties)."""
    module, device = trainee.module, next(trainee.module.parameters()).device
    packed = pack(part.prompts, part.responses, trainee.pad_token_id)
    with autocast(device, trainee.compute_dtype):
        logprobs, entropy = response_logprobs(
            module, packed, part.temperature, with_entropy=True, entropy_grad=bool(penalties.entropy_coef)
        )
    assert entropy is not None
    behavior = pad_rows(part.behavior_logprobs, logprobs)
    mask = packed.response_mask.to(device)
    advantages = part.advantages.to(device)
    versions = pad_versions(part.versions or [[] for _ in part.prompts], mask)  # unknown: all 0
    scores = {key: pad_rows(rows, logprobs) for key, rows in part.scores.items()}  # once per micro-batch
    anchor = anchor_logprobs(scope, part, logprobs, behavior, versions, scores)
    trained = logprobs
    corrected = None
    if scope.off_policy.correction.enabled:
        corrected = correct(scope.off_policy.correction, anchor, behavior, logprobs, advantages, mask)
        trained = scale_gradient(logprobs, corrected.weights)
    rewards = part.rewards.to(device) if part.rewards is not None else None
    inputs = ObjectiveInputs(trained, anchor, advantages, mask, behavior_logprobs=behavior,
                             behavior_versions=versions, counts=scope.counts, rewards=rewards)  # fmt: skip
    out = objective(inputs)
    check_loss(objective, out.loss)
    with autocast(device, trainee.compute_dtype):  # the reference computes as the policy does
        penalty, penalty_metrics = penalties(objective, logprobs, entropy, packed, part.temperature, mask)
    loss = out.loss + penalty if tally is not None else (out.loss + penalty) * 0.0
    (loss * trainee.world.size).backward()  # DDP and FSDP2 average gradients over ranks
    if tally is not None:
        tally.add(out.metrics | penalty_metrics, log_token_ratio(logprobs.detach(), anchor), entropy.detach(), mask)
        tally_factors(tally, scores, logprobs.detach(), behavior, mask)
        tally.add_versions(versions, mask, scope.version - 1)
        if corrected is not None:
            tally.correction.add(corrected, mask)
    return loss.detach().double()


def update_policy(
    trainee: Trainee,
    optimizer: torch.optim.Optimizer,
    objective: Objective,
    batch: RolloutBatch,
    epochs: int,
    minibatches: int,
    grad_clip: float,
    seed: int,
    before_step: Callable[[], None] = lambda: None,
    length_budget: int | None = None,
    penalties: Penalties = NO_PENALTIES,
    off_policy: OffPolicy = BEHAVIOR,
) -> list[dict[str, float]]:
    """`epochs` shuffled passes over the batch, `minibatches` optimizer steps per pass; each
    rank trains on its share of every minibatch (the same split whatever the world size).
    The k-th step of the round makes version `batch.trained_from` + k + 1."""
    generator = torch.Generator().manual_seed(seed % 2**63)  # any recipe seed: within torch's range
    n = len(batch.prompts)
    step_metrics = []
    trainee.module.train()
    steps = epochs * minibatches  # a bar only when a round takes several steps (one would add a line per round)
    with progress_bar("optimizer steps", total=steps) if steps > 1 else contextlib.nullcontext() as bar:
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator).tolist()
            for k in range(minibatches):
                index = order[k * n // minibatches : (k + 1) * n // minibatches]
                if index:
                    before_step()
                    step_metrics.append(update_step(
                        trainee, optimizer, objective, batch.select(index), grad_clip, length_budget, penalties,
                        off_policy, version=batch.trained_from + len(step_metrics) + 1,
                    ))  # fmt: skip
                if bar is not None:
                    bar.advance(1)
    trainee.module.eval()
    return step_metrics


def reduce_metrics(step_metrics: list[dict[str, float]]) -> dict[str, float]:
    """Mean over the round's steps; `*_min` (and `staleness/newest`) metrics take the minimum,
    `*_max` (and `staleness/oldest`) the maximum."""
    out: dict[str, float] = {}
    for key in step_metrics[0] if step_metrics else []:
        values = [m[key] for m in step_metrics if not math.isnan(m[key])]
        if not values:
            out[key] = float("nan")
        else:
            pick = extreme(key)
            out[key] = pick(values) if pick else sum(values) / len(values)
    return out
