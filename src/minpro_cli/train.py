"""`minpro train`: rounds of (rollout → GRPO advantages → policy updates with the objective).

The update itself is `step.update_policy`. All file I/O of the loop lives here, on rank 0;
under torchrun every rank runs the same loop (see `distributed`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

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
from minpro_cli.config import Recipe, dump_recipe
from minpro_cli.console import console, progress_bar, warn
from minpro_cli.distributed import (
    SINGLE,
    World,
    close_world,
    full_state_dict,
    init_world,
    parallelize,
)
from minpro_cli.errors import ConfigError, Interrupted, RolloutFileError, TrainingDivergedError
from minpro_cli.fileio import (
    append_jsonl,
    filter_jsonl_atomic,
    read_jsonl,
    write_directory_atomic,
    write_json_atomic,
    write_yaml_atomic,
)
from minpro_cli.heldout import benchmarks_of, evaluate_benchmark
from minpro_cli.lora import LoraAdapters
from minpro_cli.modeling import (
    Policy,
    compile_blocks,
    model_fingerprint,
    tokenizer_fingerprint,
)
from minpro_cli.objectives import (
    ObjectiveOptions,
)
from minpro_cli.penalties import penalties_of
from minpro_cli.resume import forget_after, is_own_checkpoint, starting_checkpoint
from minpro_cli.rollouts import check_token_ids, read_rollouts, write_rollouts
from minpro_cli.rundir import DIVERGED_FILE, owned
from minpro_cli.sampling import (
    generation_budget,
    load_recipe_policy,
    load_split,
    sample_rows,
    sampling_job,
    summarize_rows,
)
from minpro_cli.schedule import lr_multiplier
from minpro_cli.step import Trainee, reduce_metrics, training_batch, update_policy
from minpro_cli.tasks import Problem
from minpro_cli.trackers import Trackers, check_installed


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
