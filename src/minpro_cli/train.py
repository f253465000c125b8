"""`minpro train`: rounds of (rollout → GRPO advantages → policy updates with the objective).

The update step (`update_policy`) is a function of a trainee (the module forward and backward
go through, in a world of 1 or N ranks), an optimizer, an objective and a batch: no global
state and no I/O. All file I/O of the loop lives in `run_train`, on rank 0; under torchrun
every rank runs the same loop (see `distributed`).
"""

from __future__ import annotations

import copy
import itertools
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
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
    full_state_dict,
    init_world,
    loss_share,
    parallelize,
    reduce_step_metrics,
)
from minpro_cli.errors import RolloutFileError, TrainingDivergedError
from minpro_cli.eval import benchmarks_of, evaluate_benchmark
from minpro_cli.fileio import (
    append_jsonl,
    filter_jsonl_atomic,
    read_jsonl,
    write_directory_atomic,
    write_json_atomic,
    write_yaml_atomic,
)
from minpro_cli.modeling import Policy, pack, pad_rows, response_logprobs, tokenizer_fingerprint
from minpro_cli.objectives import AdvantageEstimator, ObjectiveInputs, ObjectiveOptions
from minpro_cli.objectives.logratios import log_token_ratio
from minpro_cli.ratiostats import core_metrics
from minpro_cli.rollouts import read_rollouts, write_rollouts
from minpro_cli.tasks import Problem

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
    or its DDP / FSDP2 wrapping) in its world of ranks, and the pad id batches are packed with."""

    module: torch.nn.Module
    pad_token_id: int
    world: World = SINGLE

    @classmethod
    def of(cls, policy: Policy) -> Trainee:
        return cls(policy.model, policy.pad_token_id)


def update_step(
    trainee: Trainee,
    optimizer: torch.optim.Optimizer,
    objective: ObjectiveOptions,
    batch: RolloutBatch,
    grad_clip: float,
    real: bool = True,
) -> dict[str, float]:
    """One optimizer step on this rank's share of one minibatch; raises before stepping if
    anything is not finite. `real` False: a stand-in row that contributes nothing."""
    module, world = trainee.module, trainee.world
    packed = pack(batch.prompts, batch.responses, trainee.pad_token_id)
    device = next(module.parameters()).device
    logprobs, entropy = response_logprobs(module, packed, batch.temperature, with_entropy=True)
    old = pad_rows(batch.old_logprobs, logprobs)
    mask = packed.response_mask.to(device)
    out = objective(ObjectiveInputs(logprobs, old, batch.advantages.to(device), mask))
    loss = out.loss * loss_share(mask, objective, world, real)  # this rank's share of the global loss
    global_loss = world.sum([loss.item()])[0]  # every rank sees the same, so all stop together
    if not math.isfinite(global_loss):
        raise TrainingDivergedError(f"loss is {global_loss}")
    optimizer.zero_grad(set_to_none=True)
    (loss * world.size).backward()  # DDP and FSDP2 average gradients over ranks; the shares sum
    grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: a DTensor
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingDivergedError(f"gradient norm is {grad_norm.item()}")
    optimizer.step()
    assert entropy is not None
    local = {
        "entropy": float(entropy[mask].mean()),
        **out.metrics,
        **core_metrics(log_token_ratio(logprobs.detach(), old).cpu(), mask.cpu()),
    }
    tokens = float(mask.sum()) if real else 0.0
    return {"loss": global_loss, "grad_norm": grad_norm.item(), **reduce_step_metrics(local, tokens, world)}


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
                mine = trainee.world.shard(index)
                before_step()
                step_metrics.append(
                    update_step(trainee, optimizer, objective, batch.select(mine or index[:1]), grad_clip, bool(mine))
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
            Policy(copy.deepcopy(policy.model), policy.tokenizer, policy.path) if recipe.train.staleness else policy
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
        if path.exists():  # written before an interruption: same weights and seed, reuse it
            return read_rollouts(path).to_pylist()
        if weights is not None:
            self.stale_policy.model.load_state_dict(weights)
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


class StoredRounds:
    """Round r trains on the r-th chunk (cycling) of prompt groups of a stored rollout set."""

    def __init__(self, recipe: Recipe, policy: Policy, spec: str) -> None:
        table = read_rollouts(spec)
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
            filter_jsonl_atomic(self.path, lambda e: e["round"] <= completed_rounds)
        kept = read_jsonl(self.path) if self.path.exists() else []  # other ranks may see it before the filter
        self.done = {e["round"] for e in kept if e["round"] <= completed_rounds}

    def due(self, state: LoopState) -> bool:
        every, last = self.recipe.train.eval_every, self.recipe.train.iterations
        return bool(every) and state.round not in self.done and (state.round % every == 0 or state.round == last)

    def __call__(self, policy: Policy, state: LoopState) -> None:
        record: dict[str, Any] = {"round": state.round, "step": state.step}
        for name, bench in benchmarks_of(self.recipe).items():
            result, _ = evaluate_benchmark(self.recipe, policy, bench)
            prefix = f"eval/{name}/" if name else "eval/"
            record |= {prefix + key: value for key, value in result.items() if isinstance(value, float)}
        append_jsonl(self.path, record)
        self.done.add(state.round)


def warn_truncated_sampling(rows: list[dict[str, Any]], objective: ObjectiveOptions, name: str) -> None:
    truncated = any(float(r["top_p"]) < 1.0 or int(r["top_k"]) > 0 for r in rows)
    if truncated and objective.uses_prefix_weight:
        warn(
            f"rollouts were sampled with top-p < 1 or top-k > 0: μ is renormalised, so π_θ/μ < 1 on "
            f"sampled tokens even on-policy, and the '{name}' prefix weight compounds that bias; "
            "prefer top_p=1, top_k=0"
        )


def recipe_objective(recipe: Recipe) -> ObjectiveOptions:
    """The recipe's objective; a constant-normaliser objective without a length gets the
    sampler's max_new_tokens (Dr.GRPO's L_max), not the padded width of each batch."""
    objective: ObjectiveOptions = recipe.plugin("objectives")
    if objective.loss_agg == "seq-mean-token-sum-norm" and objective.max_response_length is None:
        length = getattr(recipe.plugin("samplers"), "max_new_tokens", None)
        if isinstance(length, int):
            objective = objective.model_copy(update={"max_response_length": length})
    return objective


def run_train(recipe: Recipe) -> Path:
    """The training loop; under torchrun (WORLD_SIZE > 1) every rank runs it."""
    world = init_world(recipe.distributed.backend, recipe.distributed.timeout_s)
    quiet = console.quiet
    console.quiet = quiet or not world.is_main  # one rank speaks
    try:
        return train_loop(recipe, world)
    finally:
        console.quiet = quiet
        close_world(world)


def train_loop(recipe: Recipe, world: World) -> Path:
    cfg, run_dir = recipe.train, Path(recipe.run_dir)
    staleness = 0 if cfg.rollouts else cfg.staleness  # stored rollouts carry their own staleness
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_yaml_atomic(run_dir / "config.yaml", dump_recipe(recipe))
    world.barrier()
    resume_from = latest_checkpoint(run_dir)
    policy = load_recipe_policy(recipe, str(resume_from) if resume_from else None)
    sharded = world.size > 1 and recipe.distributed.strategy == "fsdp"
    # FSDP2 shards the model in place: sampling and evaluation run on a whole copy
    plain = Policy(copy.deepcopy(policy.model), policy.tokenizer, policy.path) if sharded else policy
    source = StoredRounds(recipe, policy, cfg.rollouts) if cfg.rollouts else OnlineRounds(recipe, plain, run_dir, world)
    trainee = Trainee(parallelize(policy.model, recipe.distributed.strategy, world), policy.pad_token_id, world)
    optimizer = torch.optim.AdamW(
        trainee.module.parameters(),
        lr=recipe.optim.lr,
        betas=recipe.optim.betas,
        weight_decay=recipe.optim.weight_decay,
    )
    state, snapshots = LoopState(), {}
    if resume_from is not None:
        state, snapshots = load_checkpoint_state(resume_from, trainee.module, optimizer)
        console.print(f"resuming from {resume_from} (round {state.round}, step {state.step})")
    metrics_path = run_dir / "metrics.jsonl"
    if world.is_main:
        (run_dir / DIVERGED_FILE).unlink(missing_ok=True)  # a new attempt: an earlier divergence no longer stands
        filter_jsonl_atomic(metrics_path, lambda m: m["round"] < state.round)  # rounds after the checkpoint are redone

    def refresh_plain() -> None:  # collective under FSDP2
        if sharded:
            plain.model.load_state_dict(full_state_dict(trainee.module, world))

    objective = recipe_objective(recipe)
    estimator = cfg.advantage or objective.default_advantage
    trainee.module.eval()
    held_out = HeldOutEvals(recipe, run_dir, state.round, world)

    def evaluate() -> None:
        if held_out.due(state):
            refresh_plain()
            if world.is_main:
                held_out(plain, state)
            else:
                held_out.done.add(state.round)
            world.barrier()

    evaluate()  # before the first round, or the one an interruption skipped

    def set_lr() -> None:
        warm = min(1.0, (state.step + 1) / recipe.optim.warmup_steps) if recipe.optim.warmup_steps else 1.0
        for group in optimizer.param_groups:
            group["lr"] = recipe.optim.lr * warm

    def count_step() -> None:
        set_lr()
        state.step += 1

    with progress_bar("training", total=cfg.iterations) as bar:
        bar.advance(state.round)
        for round_ in range(state.round, cfg.iterations):
            started = time.perf_counter()
            if staleness:
                snapshots[round_] = full_state_dict(trainee.module, world)
                state.snapshot_steps[round_] = state.step
            elif not cfg.rollouts:
                refresh_plain()
            sample_round = max(0, round_ - staleness)
            weights = snapshots.get(sample_round) if staleness else None
            version = state.snapshot_steps.get(sample_round, state.step) if staleness else state.step
            rows = source.rows(round_, weights, version)
            if round_ == state.round:
                warn_truncated_sampling(rows, objective, recipe.objective.name)
            batch = training_batch(rows, estimator, cfg.drop_zero_variance_groups)
            if batch is None:
                warn(f"round {round_}: every group's responses got the same reward; no update this round")
            try:
                step_metrics = [] if batch is None else update_policy(
                    trainee, optimizer, objective, batch, cfg.epochs, cfg.minibatches,
                    recipe.optim.grad_clip, seed=recipe.seed * 100_003 + round_, before_step=count_step,
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
