"""`minpro train`: rounds of (rollout → GRPO advantages → policy updates with the objective).

The update step (`update_policy`) is a function of a trainee (the module forward and backward
go through, in a world of 1 or N ranks), an optimizer, an objective and a batch: no global
state and no I/O. All file I/O of the loop lives in `run_train`, on rank 0; under torchrun
every rank runs the same loop (see `distributed`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from minpro_cli.advantages import compute_advantages, group_indices, zero_variance_groups
from minpro_cli.checkpoints import (
    LoopState,
    StateDict,
    export_hf,
    latest_checkpoint,
    load_checkpoint_state,
    save_checkpoint,
    whole_weights,
    write_loop_state,
)
from minpro_cli.collect import load_recipe_policy, load_split, sample_rows, sampling_job, summarize_rows
from minpro_cli.config import Recipe, dump_recipe
from minpro_cli.console import console, progress_bar, warn
from minpro_cli.distributed import (
    SINGLE,
    World,
    close_world,
    combine_metrics,
    full_state_dict,
    gradient_sync,
    init_world,
    parallelize,
    reduce_step_metrics,
)
from minpro_cli.errors import ConfigError, Interrupted, RolloutFileError, TrainingDivergedError
from minpro_cli.eval import benchmarks_of, evaluate_benchmark
from minpro_cli.fileio import (
    append_jsonl,
    filter_jsonl_atomic,
    read_jsonl,
    write_directory_atomic,
    write_json_atomic,
    write_yaml_atomic,
)
from minpro_cli.lora import LoraAdapters
from minpro_cli.modeling import (
    Policy,
    autocast,
    compile_blocks,
    model_fingerprint,
    pack,
    pad_rows,
    response_logprobs,
    tokenizer_fingerprint,
)
from minpro_cli.objectives import (
    AdvantageEstimator,
    MinibatchCounts,
    ObjectiveInputs,
    ObjectiveOptions,
    minibatch_counts,
)
from minpro_cli.objectives.logratios import log_token_ratio
from minpro_cli.penalties import NO_PENALTIES, Penalties, penalties_of
from minpro_cli.ratiostats import StepRatios
from minpro_cli.resume import forget_after, is_own_checkpoint, starting_checkpoint
from minpro_cli.rollouts import check_token_ids, read_rollouts, write_rollouts
from minpro_cli.rundir import owned
from minpro_cli.schedule import lr_multiplier
from minpro_cli.tasks import Problem
from minpro_cli.trackers import Trackers, check_installed

DIVERGED_FILE = "diverged.json"  # written when a non-finite loss or gradient stops the run


@dataclass
class RolloutBatch:
    """One round's training data: token ids, behaviour log-probs and advantages."""

    prompts: list[list[int]]
    responses: list[list[int]]
    old_logprobs: list[list[float]]
    advantages: torch.Tensor  # (B,)
    temperature: float

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]], advantages: torch.Tensor) -> RolloutBatch:
        temperatures = {round(float(r["temperature"]), 6) for r in rows}
        if len(temperatures) != 1:
            raise RolloutFileError(f"a training batch mixes sampling temperatures {sorted(temperatures)}")
        return cls(
            prompts=[list(r["prompt_token_ids"]) for r in rows],
            responses=[list(r["response_token_ids"]) for r in rows],
            old_logprobs=[list(r["behavior_logprobs"]) for r in rows],
            advantages=advantages,
            temperature=temperatures.pop(),
        )

    def select(self, index: list[int]) -> RolloutBatch:
        return RolloutBatch(
            prompts=[self.prompts[i] for i in index],
            responses=[self.responses[i] for i in index],
            old_logprobs=[self.old_logprobs[i] for i in index],
            advantages=self.advantages[index],
            temperature=self.temperature,
        )


def training_batch(
    rows: list[dict[str, Any]], estimator: AdvantageEstimator, drop_zero_variance: bool
) -> RolloutBatch | None:
    """Advantages per response; with `drop_zero_variance`, groups whose rewards are all equal
    are left out (None when nothing is left)."""
    rewards = torch.tensor([float(r["reward"]) for r in rows], dtype=torch.float64)
    group = group_indices([r["prompt_id"] for r in rows])
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


def micro_batches(prompt_lengths: list[int], response_lengths: list[int], budget: int | None) -> list[list[int]]:
    """Row indices of each micro-batch. A packed micro-batch holds rows × (longest prompt +
    longest response) tokens; rows go longest first into the current micro-batch while that
    stays within `budget` (a row over the budget alone gets one). None: one micro-batch, in order."""
    n = len(prompt_lengths)
    if budget is None or n == 0:
        return [list(range(n))] if n else []
    responses = [max(n, 1) for n in response_lengths]  # `pack` pads responses to at least 1 column
    order = sorted(range(n), key=lambda i: prompt_lengths[i] + responses[i], reverse=True)
    out: list[list[int]] = []
    current: list[int] = []
    widest_prompt = widest_response = 0
    for i in order:
        prompt, response = max(widest_prompt, prompt_lengths[i]), max(widest_response, responses[i])
        if current and (len(current) + 1) * (prompt + response) > budget:
            out.append(current)
            current, prompt, response = [], prompt_lengths[i], responses[i]
        current.append(i)
        widest_prompt, widest_response = prompt, response
    return [*out, current]


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


@dataclass
class StepTally:
    """Metrics of one optimizer step, accumulated over its micro-batches as device tensors and
    read back once per step (no host sync per micro-batch): token-weighted means, extremes,
    and the ratio statistics of every trained token."""

    ratios: StepRatios = field(default_factory=StepRatios)
    objective: list[tuple[dict[str, float | torch.Tensor], torch.Tensor]] = field(default_factory=list)
    entropy_sum: list[torch.Tensor] = field(default_factory=list)

    def add(
        self, metrics: dict[str, float | torch.Tensor], log_rho: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor
    ) -> None:
        self.objective.append((metrics, mask.sum()))
        self.ratios.add(log_rho, mask)
        self.entropy_sum.append(torch.where(mask, entropy.double(), 0.0).sum())

    def metrics(self) -> tuple[dict[str, float], float]:
        """The step's metrics and its trained-token count, from one device-to-host transfer."""
        scalars: list[float | torch.Tensor] = []

        def slot(value: float | torch.Tensor) -> int:  # index of `value` in the one transfer
            scalars.append(value)
            return len(scalars) - 1

        parts = [({key: slot(v) for key, v in m.items()}, slot(n)) for m, n in self.objective]
        ratios = {key: slot(v) for key, v in self.ratios.tensors().items()}
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
    objective: ObjectiveOptions,
    minibatch: RolloutBatch,
    grad_clip: float,
    length_budget: int | None = None,
    penalties: Penalties = NO_PENALTIES,
) -> dict[str, float]:
    """One optimizer step on one minibatch: this rank's share of it, cut into micro-batches
    within `trainee.micro_batch_tokens`, gradients accumulated, then one step. The loss is the
    objective's plus `penalties` (KL to a reference, entropy bonus).

    Every micro-batch's loss is normalised by the counts of the whole minibatch (all
    micro-batches, all ranks; `length_budget` is Dr.GRPO's L when the objective pins none),
    so the step is the same however the minibatch is cut. Every rank runs the same number of
    forward/backward passes (a rank with fewer runs stand-ins that contribute 0), as DDP and
    FSDP2 need. Raises before stepping if the loss or the gradient is not finite.
    """
    module, world = trainee.module, trainee.world
    device = next(module.parameters()).device
    counts = MinibatchCounts.of_lengths([len(r) for r in minibatch.responses], length_budget)
    mine, passes = micro_batch_plan(minibatch, world, trainee.micro_batch_tokens)
    optimizer.zero_grad(set_to_none=True)
    tally, loss_sum = StepTally(), torch.zeros((), dtype=torch.float64, device=device)
    with minibatch_counts(counts):
        for k in range(passes):
            real = k < len(mine)
            part = minibatch.select(mine[k] if real else [0])
            packed = pack(part.prompts, part.responses, trainee.pad_token_id)
            with gradient_sync(module, k == passes - 1):  # forward and backward: DDP decides at forward
                with autocast(device, trainee.compute_dtype):
                    logprobs, entropy = response_logprobs(
                        module, packed, part.temperature, with_entropy=True, entropy_grad=bool(penalties.entropy_coef)
                    )
                assert entropy is not None
                old = pad_rows(part.old_logprobs, logprobs)
                mask = packed.response_mask.to(device)
                out = objective(ObjectiveInputs(logprobs, old, part.advantages.to(device), mask))
                with autocast(device, trainee.compute_dtype):  # the reference computes as the policy does
                    penalty, penalty_metrics = penalties(objective, logprobs, entropy, packed, part.temperature, mask)
                loss = out.loss + penalty if real else (out.loss + penalty) * 0.0
                (loss * world.size).backward()  # DDP and FSDP2 average gradients over ranks
            loss_sum += loss.detach().double()
            if real:
                metrics = out.metrics | penalty_metrics
                tally.add(metrics, log_token_ratio(logprobs.detach(), old), entropy.detach(), mask)
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
    metrics, tokens = tally.metrics()
    return {"loss": global_loss, "grad_norm": grad_norm.item(), **reduce_step_metrics(metrics, tokens, world)}


def update_policy(
    trainee: Trainee,
    optimizer: torch.optim.Optimizer,
    objective: ObjectiveOptions,
    batch: RolloutBatch,
    epochs: int,
    minibatches: int,
    grad_clip: float,
    seed: int,
    before_step: Callable[[], None] = lambda: None,
    length_budget: int | None = None,
    penalties: Penalties = NO_PENALTIES,
) -> list[dict[str, float]]:
    """`epochs` shuffled passes over the batch, `minibatches` optimizer steps per pass; each
    rank trains on its share of every minibatch (the same split whatever the world size)."""
    generator = torch.Generator().manual_seed(seed)
    n = len(batch.prompts)
    step_metrics = []
    trainee.module.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).tolist()
        for k in range(minibatches):
            index = order[k * n // minibatches : (k + 1) * n // minibatches]
            if index:
                before_step()
                step_metrics.append(
                    update_step(trainee, optimizer, objective, batch.select(index), grad_clip, length_budget, penalties)
                )
    trainee.module.eval()
    return step_metrics


def reduce_metrics(step_metrics: list[dict[str, float]]) -> dict[str, float]:
    """Mean over the round's steps; `*_min` metrics take the minimum, `*_max` the maximum."""
    out: dict[str, float] = {}
    for key in step_metrics[0] if step_metrics else []:
        values = [m[key] for m in step_metrics if not math.isnan(m[key])]
        if not values:
            out[key] = float("nan")
        elif key.endswith("_min"):
            out[key] = min(values)
        elif key.endswith("_max"):
            out[key] = max(values)
        else:
            out[key] = sum(values) / len(values)
    return out


class OnlineRounds:
    """Round r samples `prompts_per_iteration` training problems with the weights of round
    r − staleness (the paper's off-policy knob) and stores them as parquet in the run dir.
    Under torchrun each rank samples its share of the problems and rank 0 writes them all."""

    def __init__(self, recipe: Recipe, policy: Policy, run_dir: Path, world: World = SINGLE) -> None:
        self.recipe, self.run_dir, self.world = recipe, run_dir, world
        self.problems = load_split(recipe, "train")
        self.stale_policy = (
            policy.copy() if recipe.train.staleness else policy
        )
        self.job = sampling_job(recipe, self.stale_policy)

    def problems_for(self, round_: int) -> list[Problem]:
        """Deterministic passes over the training split, reshuffled each pass."""
        per_round = self.recipe.train.prompts_per_iteration
        start, out = round_ * per_round, []
        while len(out) < per_round:
            pass_index, offset = divmod(start + len(out), len(self.problems))
            order = list(range(len(self.problems)))
            random.Random(self.recipe.seed * 7919 + pass_index).shuffle(order)
            take = order[offset : offset + per_round - len(out)]
            out.extend(self.problems[i] for i in take)
        return out

    def rows(self, round_: int, weights: StateDict | None, version: int) -> list[dict[str, Any]]:
        path = self.run_dir / "rollouts" / f"round_{round_:05d}.parquet"
        if weights is not None:
            self.stale_policy.model.load_state_dict(weights)
        if path.exists():  # written before an interruption: same weights and seed, reuse it
            rows = read_rollouts(path).to_pylist()
            self.check_reused(path, rows, round_, version)
            return rows
        self.job.policy_version = version
        world = self.world
        mine, _ = sample_rows(
            self.job,
            world.shard(self.problems_for(round_)),
            self.recipe.train.group_size,
            seed=(self.recipe.seed * 100_003 + round_) * world.size + world.rank,
            label=f"round {round_} sampling",
        )
        rows = world.gather(mine)  # every rank has checked `path` before rank 0 writes it
        if world.is_main:
            write_rollouts(path, rows, dump_recipe(self.recipe))
        return rows

    def check_reused(self, path: Path, rows: list[dict[str, Any]], round_: int, version: int) -> None:
        """A round file is reused only if this run sampled it: the round's prompts, each
        `group_size` times, by the weights and tokenizer this round samples with."""
        policy = self.stale_policy
        expected: dict[str, Any] = {
            "prompts": Counter({p.id: self.recipe.train.group_size for p in self.problems_for(round_)}),
            "policy_version": {version},
            "model_fingerprint": {model_fingerprint(policy.model)},
            "tokenizer_fingerprint": {tokenizer_fingerprint(policy.tokenizer)},
        }
        found: dict[str, Any] = {"prompts": Counter(r["prompt_id"] for r in rows)}
        found |= {key: {r[key] for r in rows} for key in expected if key != "prompts"}
        differ = [key for key in expected if found[key] != expected[key]]
        if differ:
            raise RolloutFileError(
                f"{path}: not this run's round {round_} (its {', '.join(differ)} differ from what this round samples "
                "with); move the file away and rerun to sample the round again"
            )


class StoredRounds:
    """Round r trains on the r-th chunk (cycling) of prompt groups of a stored rollout set."""

    def __init__(self, recipe: Recipe, policy: Policy, spec: str) -> None:
        table = read_rollouts(spec)
        check_token_ids(spec, table, policy.vocab_size)
        expected = tokenizer_fingerprint(policy.tokenizer)
        found = set(table["tokenizer_fingerprint"].to_pylist())
        if found != {expected}:
            raise RolloutFileError(
                f"{spec}: rollouts were tokenized with tokenizer {sorted(found)}, the policy's is {expected}; "
                "train with the model that sampled them (model.path)"
            )
        groups: dict[str, list[dict[str, Any]]] = {}
        for row in table.to_pylist():
            groups.setdefault(row["prompt_id"], []).append(row)
        per_round = recipe.train.prompts_per_iteration
        ordered = list(groups.values())
        self.chunks = [list(itertools.chain(*ordered[i : i + per_round])) for i in range(0, len(ordered), per_round)]

    def rows(self, round_: int, weights: StateDict | None, version: int) -> list[dict[str, Any]]:
        return self.chunks[round_ % len(self.chunks)]


class HeldOutEvals:
    """pass@k of the current weights on the recipe's eval benchmarks before the first round,
    every `train.eval_every` rounds and after the last: one line per evaluation in evals.jsonl.
    Each evaluation samples with the same seed, so successive points differ by the policy only."""

    def __init__(self, recipe: Recipe, run_dir: Path, completed_rounds: int, world: World = SINGLE) -> None:
        self.recipe, self.path = recipe, run_dir / "evals.jsonl"
        if world.is_main:  # evaluations after the checkpoint are redone
            filter_jsonl_atomic(self.path, "round", lambda e: e["round"] <= completed_rounds)
        kept = read_jsonl(self.path, "round") if self.path.exists() else []  # other ranks may see it before the filter
        self.done = {e["round"] for e in kept if e["round"] <= completed_rounds}

    def due(self, state: LoopState) -> bool:
        every, last = self.recipe.train.eval_every, self.recipe.train.iterations
        return bool(every) and state.round not in self.done and (state.round % every == 0 or state.round == last)

    def __call__(self, policy: Policy, state: LoopState) -> dict[str, Any]:
        record: dict[str, Any] = {"round": state.round, "step": state.step}
        for name, bench in benchmarks_of(self.recipe).items():
            result, _ = evaluate_benchmark(self.recipe, policy, bench)
            prefix = f"eval/{name}/" if name else "eval/"
            record |= {prefix + key: value for key, value in result.items() if isinstance(value, float)}
        append_jsonl(self.path, record)
        self.done.add(state.round)
        shown = [f"{key.removeprefix('eval/')} {value:.3f}" for key, value in record.items() if key.endswith("pass@1")]
        console.print(f"held-out after round {state.round} (step {state.step}): {', '.join(shown)}")
        return record


def warn_truncated_sampling(rows: list[dict[str, Any]], objective: ObjectiveOptions, name: str) -> None:
    truncated = any(float(r["top_p"]) < 1.0 or int(r["top_k"]) > 0 for r in rows)
    if truncated and objective.uses_prefix_weight:
        warn(
            f"rollouts were sampled with top-p < 1 or top-k > 0: μ is renormalised, so π_θ/μ < 1 on "
            f"sampled tokens even on-policy, and the '{name}' prefix weight compounds that bias; "
            "prefer top_p=1, top_k=0"
        )


def generation_budget(recipe: Recipe) -> int | None:
    """The sampler's max_new_tokens: Dr.GRPO's constant L when the objective pins none."""
    length = getattr(recipe.plugin("samplers"), "max_new_tokens", None)
    return length if isinstance(length, int) else None


@contextlib.contextmanager
def _shut_down_on_exit(executor: ThreadPoolExecutor) -> Iterator[None]:
    """An error or Ctrl-C in the loop drops queued sampling; a running batch finishes first."""
    try:
        yield
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def run_train(recipe: Recipe, resume: str = "auto") -> Path:
    """The training loop; under torchrun (WORLD_SIZE > 1) every rank runs it. `resume`: `auto`
    (the run directory's latest checkpoint, if its recipe matches), `never`, or a checkpoint."""
    recipe.model.check_device()  # before anything is written
    check_installed(recipe)
    if recipe.model.dtype == "float16":
        raise ConfigError(
            "model.dtype=float16 cannot train: float16 gradients underflow without loss scaling, which minpro does "
            "not do; train with model.dtype=bfloat16 (float16 is for rollout and eval)"
        )
    if recipe.train.pipeline and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("train.pipeline runs in one process; drop it under torchrun (--nproc)")
    world = init_world(recipe.distributed.backend, recipe.distributed.timeout_s)
    quiet = console.quiet
    console.quiet = quiet or not world.is_main  # one rank speaks
    try:
        # rank 0 owns the directory: refuses someone else's, locks out a second run, clears leftovers
        with owned(Path(recipe.run_dir)) if world.is_main else contextlib.nullcontext():
            return train_loop(recipe, world, resume)
    except KeyboardInterrupt:
        last = latest_checkpoint(Path(recipe.run_dir))
        raise Interrupted(f"the last complete checkpoint is {last}" if last else "no checkpoint was written yet") from None
    finally:
        console.quiet = quiet
        close_world(world)


def train_loop(recipe: Recipe, world: World, resume: str = "auto") -> Path:
    cfg, run_dir = recipe.train, Path(recipe.run_dir)
    staleness = 0 if cfg.rollouts else cfg.staleness  # stored rollouts carry their own staleness
    resume_from = starting_checkpoint(run_dir, resume, recipe)
    policy = load_recipe_policy(recipe, str(resume_from) if resume_from else None)
    sharded = world.size > 1 and recipe.distributed.strategy == "fsdp"
    # FSDP2 shards the model in place, LoRA adapts it: sampling and evaluation run on a whole, plain copy
    plain = policy.copy() if sharded or recipe.model.lora else policy
    if recipe.model.lora:
        policy.adapters = LoraAdapters.attach(policy.model, recipe.model.lora, seed=recipe.seed)
    source = StoredRounds(recipe, policy, cfg.rollouts) if cfg.rollouts else OnlineRounds(recipe, plain, run_dir, world)
    if recipe.train.activation_checkpointing:  # per decoder layer (per sharded block under FSDP2)
        policy.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if recipe.train.compile:  # after the sampling copies above were taken: they stay plain modules
        compile_blocks(policy.model)
    trainee = Trainee(
        parallelize(policy.model, recipe.distributed.strategy, world),
        policy.pad_token_id,
        world,
        policy.compute_dtype,
        cfg.micro_batch_tokens,
    )
    optimizer = recipe.optim.build([p for p in trainee.module.parameters() if p.requires_grad])  # LoRA: adapters
    state, snapshots = LoopState(), {}
    if resume_from is not None:
        state, snapshots = load_checkpoint_state(resume_from, trainee.module, optimizer)
        console.print(f"resuming from {resume_from} (round {state.round}, step {state.step})")
    metrics_path = run_dir / "metrics.jsonl"
    if world.is_main:  # the inputs are read and checked: from here on the run writes
        if resume_from is not None and resume not in ("auto", "never") and is_own_checkpoint(run_dir, resume_from):
            forget_after(run_dir, resume_from)
        filter_jsonl_atomic(metrics_path, "round", lambda m: m["round"] < state.round)  # rounds after the checkpoint are redone
        (run_dir / DIVERGED_FILE).unlink(missing_ok=True)  # a new attempt: an earlier divergence no longer stands
        write_yaml_atomic(run_dir / "config.yaml", dump_recipe(recipe))

    def sampling_weights() -> StateDict:  # collective under FSDP2
        weights = full_state_dict(trainee.module, world)
        return policy.adapters.merged(weights) if policy.adapters else weights

    def refresh_plain() -> None:
        if plain is not policy:
            plain.model.load_state_dict(sampling_weights())

    objective: ObjectiveOptions = recipe.plugin("objectives")
    length_budget = generation_budget(recipe)
    estimator = cfg.advantage or objective.default_advantage
    penalties = penalties_of(recipe, policy, trainee.module, world)
    trainee.module.eval()
    held_out = HeldOutEvals(recipe, run_dir, state.round, world)
    trackers = Trackers(recipe, run_dir, enabled=world.is_main)

    def evaluate() -> None:
        if held_out.due(state):
            refresh_plain()
            if world.is_main:
                trackers.log(held_out(plain, state))
            else:
                held_out.done.add(state.round)
            world.barrier()

    def set_lr() -> None:
        o = recipe.optim
        total = cfg.iterations * cfg.epochs * cfg.minibatches
        for group in optimizer.param_groups:
            group["lr"] = o.lr * lr_multiplier(state.step, total, o.schedule, o.warmup_steps, o.min_lr_ratio)

    def count_step() -> None:
        set_lr()
        state.step += 1

    # train.pipeline: round r+1's rows are sampled in this thread while round r trains
    sampler_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minpro-sampler")
    pending: dict[int, Future[list[dict[str, Any]]]] = {}
    with progress_bar("training", total=cfg.iterations) as bar, _shut_down_on_exit(sampler_thread), trackers:
        evaluate()  # before the first round, or the one an interruption skipped
        bar.advance(state.round)
        for round_ in range(state.round, cfg.iterations):
            started = time.perf_counter()
            if staleness:
                snapshots[round_] = sampling_weights()
                state.snapshot_steps[round_] = state.step
            elif not cfg.rollouts:
                refresh_plain()
            sample_round = max(0, round_ - staleness)
            weights = snapshots.get(sample_round) if staleness else None
            version = state.snapshot_steps.get(sample_round, state.step) if staleness else state.step
            rows = pending.pop(round_).result() if round_ in pending else source.rows(round_, weights, version)
            if cfg.pipeline and round_ + 1 < cfg.iterations:  # its weights (round r+1−s ≤ r) exist already
                ahead = max(0, round_ + 1 - staleness)
                pending[round_ + 1] = sampler_thread.submit(
                    source.rows, round_ + 1, snapshots[ahead], state.snapshot_steps[ahead]
                )
            if round_ == state.round:
                warn_truncated_sampling(rows, objective, recipe.objective.name)
            batch = training_batch(rows, estimator, cfg.drop_zero_variance_groups)
            if batch is None:
                warn(f"round {round_}: every group's responses got the same reward; no update this round")
            try:
                step_metrics = [] if batch is None else update_policy(
                    trainee, optimizer, objective, batch, cfg.epochs, cfg.minibatches,
                    recipe.optim.grad_clip, seed=recipe.seed * 100_003 + round_, before_step=count_step,
                    length_budget=length_budget, penalties=penalties,
                )
            except TrainingDivergedError as exc:
                last = latest_checkpoint(run_dir)
                if world.is_main:
                    record = {"round": round_, "step": state.step, "reason": str(exc)}
                    write_json_atomic(run_dir / DIVERGED_FILE, record)
                raise TrainingDivergedError(
                    f"round {round_}, step {state.step}: {exc} (objective '{recipe.objective.name}', "
                    f"lr {recipe.optim.lr}); last good checkpoint: {last or 'none'}; "
                    "lower optim.lr or raise the objective's clipping, then rerun to resume"
                ) from None
            for old in [r for r in snapshots if r < round_ + 1 - staleness]:  # next round needs r+1−s
                snapshots.pop(old)
                state.snapshot_steps.pop(old, None)
            state.round = round_ + 1
            sampled_version = min(int(r["policy_version"]) for r in rows)
            record = {
                "round": round_,
                "step": state.step,
                "policy_version": sampled_version,
                "staleness_steps": state.step - len(step_metrics) - sampled_version,
                "lr": optimizer.param_groups[0]["lr"],
                **summarize_rows(rows),
                "responses_trained": 0 if batch is None else len(batch.prompts),
                **reduce_metrics(step_metrics),
                "time_s": time.perf_counter() - started,
            }
            if world.is_main:
                append_jsonl(metrics_path, record)
                trackers.log(record)
            bar.advance(1, info=f"reward {record['reward_mean']:.3f}  loss {record.get('loss', math.nan):+.4f}")
            if state.round % cfg.checkpoint_every == 0 or state.round == cfg.iterations:
                save_checkpoint(
                    run_dir, policy, trainee.module, optimizer, state, snapshots, cfg.keep_checkpoints, world
                )
            evaluate()

    final = run_dir / "final"
    whole = whole_weights(trainee.module)
    if world.is_main:

        def fill_final(tmp: Path) -> None:
            export_hf(policy, trainee.module, whole, tmp)
            write_loop_state(tmp, state)

        write_directory_atomic(final, fill_final)
        console.print(f"final weights: {final}")
    world.barrier()
    return final
