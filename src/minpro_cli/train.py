"""`minpro train`: rounds of (rollout → GRPO advantages → policy updates with the objective).

The update itself is `step.update_policy`. All file I/O of the loop lives here, on rank 0;
under torchrun every rank runs the same loop (see `distributed`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from minpro_cli.anchors import OffPolicy, Rescorer
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
from minpro_cli.dedicated import DedicatedRounds
from minpro_cli.distributed import (
    SINGLE,
    World,
    close_world,
    full_state_dict,
    init_world,
    parallelize,
    snapshot_state,
    whole_state,
)
from minpro_cli.errors import ConfigError, Interrupted, TrainingDivergedError
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
from minpro_cli.modeling import Policy, compile_blocks
from minpro_cli.objectives import (
    Objective,
)
from minpro_cli.penalties import penalties_of
from minpro_cli.resume import forget_after, is_own_checkpoint, starting_checkpoint
from minpro_cli.rollouts import RolloutRow
from minpro_cli.rounds import LaterWeights, OnlineRounds, StaleWeights, StoredRounds
from minpro_cli.rundir import DIVERGED_FILE, owned
from minpro_cli.sampling import (
    Plugins,
    load_recipe_policy,
    summarize_rows,
)
from minpro_cli.schedule import lr_multiplier
from minpro_cli.step import RolloutBatch, Trainee, reduce_metrics, training_batch, update_policy
from minpro_cli.trackers import Trackers, check_installed
from minpro_cli.weightsync import named_weights, planned_bytes


class HeldOutEvals:
    """pass@k of the current weights on the recipe's eval benchmarks before the first round,
    every `train.eval_every` rounds and after the last: one line per evaluation in evals.jsonl.
    Each evaluation samples with the same seed, so successive points differ by the policy only."""

    def __init__(self, recipe: Recipe, plugins: Plugins, run_dir: Path, completed_rounds: int,
                 world: World = SINGLE) -> None:
        self.recipe, self.plugins, self.path = recipe, plugins, run_dir / "evals.jsonl"
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
            result, _ = evaluate_benchmark(self.recipe, policy, self.plugins, name, bench)
            prefix = f"eval/{name}/" if name else "eval/"
            record |= {prefix + key: value for key, value in result.items() if isinstance(value, float)}
        append_jsonl(self.path, record)
        self.done.add(state.round)
        shown = [f"{key.removeprefix('eval/')} {value:.3f}" for key, value in record.items() if key.endswith("pass@1")]
        console.print(f"held-out after round {state.round} (step {state.step}): {', '.join(shown)}")
        return record


def warn_truncated_sampling(rows: list[RolloutRow], objective: Objective, name: str) -> None:
    truncated = any(r.top_p < 1.0 or r.top_k > 0 for r in rows)
    if truncated and objective.uses_prefix_weight:
        warn(
            f"rollouts were sampled with top-p < 1 or top-k > 0: μ is renormalised, so π_θ/μ < 1 on "
            f"sampled tokens even on-policy, and the '{name}' prefix weight compounds that bias; "
            "prefer top_p=1, top_k=0"
        )


def check_placement(recipe: Recipe) -> None:
    """`sampler.options.placement: dedicated` and bounded staleness: what they need."""
    placement = recipe.sampler.options.get("placement", "inline")
    if placement != "dedicated":
        if recipe.train.max_staleness is not None:
            raise ConfigError("train.max_staleness (bounded staleness) needs a sampler that samples ahead on its own: "
                              "set sampler.options.placement=dedicated, or use train.staleness (exact)")  # fmt: skip
        return
    if recipe.train.pipeline or recipe.train.rollouts:
        raise ConfigError("sampler.options.placement=dedicated samples online in its own process: drop train.pipeline "
                          "(the dedicated sampler already samples ahead) and train.rollouts")  # fmt: skip
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("sampler.options.placement=dedicated runs beside a single training process for now; drop "
                          "--nproc (torchrun), or use placement=inline")  # fmt: skip


def check_partial_rollout(recipe: Recipe, sampler: object) -> None:
    """`train.partial_rollout` needs a sampler that switches weights mid-response, in one process."""
    if recipe.train.partial_rollout is None:
        return
    if not getattr(sampler, "switches_weights", False):
        raise ConfigError(f"train.partial_rollout needs a sampler that switches weights mid-response; sampler "
                          f"'{recipe.sampler.name}' does not (the hf sampler does): use sampler.name=hf")  # fmt: skip
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("train.partial_rollout samples in one process for now: drop --nproc (torchrun)")


@contextlib.contextmanager
def _shut_down_on_exit(executor: ThreadPoolExecutor, stale: StaleWeights) -> Iterator[None]:
    """An error or Ctrl-C in the loop drops queued sampling; a running batch finishes first (or
    stops, if it waits for weights the loop will not take now)."""
    try:
        yield
    finally:
        stale.abandon()
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
    check_placement(recipe)
    world = init_world(recipe.distributed.backend, recipe.distributed.timeout_s)
    quiet = console.quiet
    console.quiet = quiet or not world.is_main  # one rank speaks
    try:
        # rank 0 owns the directory: refuses someone else's, locks out a second run, clears leftovers
        with owned(Path(recipe.run_dir)) if world.is_main else contextlib.nullcontext():
            return Trainer(recipe, world, resume).run()
    except KeyboardInterrupt as exc:
        last = latest_checkpoint(Path(recipe.run_dir))
        saved = f"the last complete checkpoint is {last}" if last else "no checkpoint was written yet"
        raise Interrupted(saved, getattr(exc, "signum", None)) from None
    finally:
        console.quiet = quiet
        close_world(world)


class Trainer:
    """One rank's `minpro train`, in the order it happens: `__init__` sets up (the policy and its
    plain sampling copy, the trainee, the optimizer, the resumed state, where rows come from),
    `run` evaluates, trains `train_round` after round, and `finish` publishes `final/`."""

    def __init__(self, recipe: Recipe, world: World, resume: str = "auto") -> None:
        self.recipe, self.cfg, self.world, self.run_dir = recipe, recipe.train, world, Path(recipe.run_dir)
        resume_from = starting_checkpoint(self.run_dir, resume, recipe)
        self.set_up_models(resume_from)
        self.optimizer = recipe.optim.build([p for p in self.trainee.module.parameters() if p.requires_grad])
        self.state, snapshots = LoopState(), {}
        if resume_from is not None:
            self.state, snapshots = load_checkpoint_state(resume_from, self.trainee.module, self.optimizer)
            console.print(f"resuming from {resume_from} (round {self.state.round}, step {self.state.step})")
        self.resumed_at = self.state.round
        # stored rollouts carry their own staleness
        self.stale = StaleWeights(0 if self.cfg.rollouts else self.cfg.staleness, snapshots, self.state.snapshot_steps)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if world.is_main:  # the inputs are read and checked: from here on the run writes
            self.start_writing(resume_from, resume)
        self.objective: Objective = self.plugins.objective
        self.length_budget = self.plugins.generation_budget
        self.estimator = self.cfg.advantage or self.objective.default_advantage
        self.penalties = penalties_of(recipe, self.policy, self.trainee.module, world)
        self.trainee.module.eval()
        self.held_out = HeldOutEvals(recipe, self.plugins, self.run_dir, self.state.round, world)
        self.trackers = Trackers(recipe, self.run_dir, enabled=world.is_main)
        self.rounds_with_signal = 0  # of the rounds this process trains: none means nothing was learned
        self.sampler_metrics: dict[str, float] = {}  # a dedicated sampler's, for the round's record

    def set_up_models(self, resume_from: Path | None) -> None:
        """The policy, a plain copy that samples and evaluates when the trained module is not
        plain (FSDP2 shards it in place, LoRA adapts it), the round source and the trainee."""
        recipe, cfg = self.recipe, self.cfg
        self.plugins = Plugins.of(recipe)  # one sampler for the rounds and the evaluations
        check_partial_rollout(recipe, self.plugins.sampler)
        self.policy = load_recipe_policy(recipe, str(resume_from) if resume_from else None)
        sharded = self.world.size > 1 and recipe.distributed.strategy == "fsdp"
        # copies made only to sample are held in the sampler's own precision (bf16: half the memory)
        self.sampling_dtype = held = getattr(self.plugins.sampler, "weights_dtype", None)
        self.plain = self.policy.copy(held) if sharded or recipe.model.lora else self.policy
        self.off_policy = OffPolicy(cfg.anchor, recipe.correction, cfg.factor_metrics)
        self.needs = self.off_policy.needs() - ({"sampling_weights"} if cfg.rollouts else set())
        self.rescorer = Rescorer(self.policy, cfg.micro_batch_tokens, self.world) if self.needs else None
        # staleness snapshots serve sampling alone unless the trainer rescores with them
        self.snapshot_dtype = held if self.rescorer is None else None
        if recipe.model.lora:
            self.policy.adapters = LoraAdapters.attach(self.policy.model, recipe.model.lora, seed=recipe.seed)
        self.source: OnlineRounds | StoredRounds | DedicatedRounds
        if cfg.rollouts:
            self.source = StoredRounds(recipe, self.policy, cfg.rollouts)
        elif getattr(self.plugins.sampler, "placement", "inline") == "dedicated":
            self.source = DedicatedRounds(recipe, self.plain, self.run_dir)
        else:
            sampling = self.plain.copy(held) if cfg.staleness else self.plain  # stale weights are loaded into a copy
            self.source = OnlineRounds(recipe, sampling, self.plugins, self.run_dir, self.world)
        if isinstance(self.source, StoredRounds) and cfg.anchor == "sampling_weights":
            versions = sorted({r.policy_version for chunk in self.source.chunks for r in chunk})
            raise ConfigError(
                f"train.anchor=sampling_weights needs the weights that sampled each row, and stored rollouts "
                f"{cfg.rollouts} (policy_version {', '.join(map(str, versions[:5]))}) were sampled outside this run; "
                "use train.anchor=round_start (or loglinear), or train online"
            )
        if cfg.activation_checkpointing:  # per decoder layer (per sharded block under FSDP2)
            self.policy.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if cfg.compile:  # after the sampling copies above were taken: they stay plain modules
            compile_blocks(self.policy.model)
        module = parallelize(self.policy.model, recipe.distributed.strategy, self.world)
        self.trainee = Trainee(module, self.policy.pad_token_id, self.world, self.policy.compute_dtype,
                               cfg.micro_batch_tokens)  # fmt: skip

    def start_writing(self, resume_from: Path | None, resume: str) -> None:
        """Rank 0: forget what comes after the starting checkpoint, record the recipe."""
        if resume_from is not None and resume not in ("auto", "never") and is_own_checkpoint(self.run_dir, resume_from):
            forget_after(self.run_dir, resume_from)
        completed = self.state.round  # rounds after the checkpoint are redone
        filter_jsonl_atomic(self.metrics_path, "round", lambda m: m["round"] < completed)
        (self.run_dir / DIVERGED_FILE).unlink(missing_ok=True)  # a new attempt: an earlier divergence no longer stands
        write_yaml_atomic(self.run_dir / "config.yaml", dump_recipe(self.recipe))

    def sampling_weights(self, dtype: torch.dtype | None = None) -> StateDict:  # collective under FSDP2
        """The plain weights (LoRA merged), copied, in `dtype` (None: as trained)."""
        if not self.policy.adapters:
            return full_state_dict(self.trainee.module, self.world, dtype)
        merged = self.policy.adapters.merged(full_state_dict(self.trainee.module, self.world))  # merged in float32
        return merged if dtype is None else {k: v.to(dtype) for k, v in merged.items()}

    def snapshot(self) -> StateDict:  # collective under FSDP2
        """The round's starting weights, kept for staleness: under FSDP2 this rank's shards only."""
        if self.policy.adapters:  # merged, so whole
            return self.sampling_weights(self.snapshot_dtype)
        return snapshot_state(self.trainee.module, self.world, self.snapshot_dtype)

    def refresh_plain(self) -> None:
        if self.plain is not self.policy:
            self.plain.model.load_state_dict(self.sampling_weights())

    def evaluate(self) -> None:
        if self.held_out.due(self.state):
            self.refresh_plain()
            if self.world.is_main:
                self.trackers.log(self.held_out(self.plain, self.state))
            else:
                self.held_out.done.add(self.state.round)
            self.world.barrier()

    def count_step(self) -> None:
        """Before each optimizer step: its learning rate, a function of the step alone."""
        o, cfg = self.recipe.optim, self.cfg
        total = cfg.iterations * cfg.epochs * cfg.minibatches
        for group in self.optimizer.param_groups:
            group["lr"] = o.lr * lr_multiplier(self.state.step, total, o.schedule, o.warmup_steps, o.min_lr_ratio)
        self.state.step += 1

    def run(self) -> Path:
        # train.pipeline: round r+1's rows are sampled in this thread while round r trains
        sampler_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minpro-sampler")
        self.pending: dict[int, Future[list[RolloutRow]]] = {}
        dedicated = self.source if isinstance(self.source, DedicatedRounds) else None
        with progress_bar("training", total=self.cfg.iterations) as bar, _shut_down_on_exit(sampler_thread, self.stale), \
                self.trackers, contextlib.closing(dedicated) if dedicated else contextlib.nullcontext():  # fmt: skip
            self.evaluate()  # before the first round, or the one an interruption skipped
            bar.advance(self.state.round)
            for round_ in range(self.state.round, self.cfg.iterations):
                record = self.train_round(round_, sampler_thread)
                bar.advance(1, info=f"reward {record['reward_mean']:.3f}  loss {record.get('loss', math.nan):+.4f}")
                if self.state.round % self.cfg.checkpoint_every == 0 or self.state.round == self.cfg.iterations:
                    save_checkpoint(self.run_dir, self.policy, self.trainee.module, self.optimizer, self.state,
                                    self.stale.snapshots, self.cfg.keep_checkpoints, self.world)  # fmt: skip
                self.evaluate()
        return self.finish()

    def round_rows(self, round_: int, sampler_thread: ThreadPoolExecutor) -> list[RolloutRow]:
        """This round's rows (sampled ahead by the pipeline or a dedicated sampler, or now), and
        the rounds sampled ahead asked for."""
        if self.stale.staleness:
            if round_ not in self.stale.snapshots:  # (a pipelined partial rollout took it as the last round ended)
                self.stale.take(round_, self.snapshot(), self.state.step)
        elif not self.cfg.rollouts and not isinstance(self.source, DedicatedRounds):
            self.refresh_plain()
        if isinstance(self.source, DedicatedRounds):
            rows = self.dedicated_rows(round_, self.source)
        elif round_ in self.pending:
            rows = self.pending.pop(round_).result()
        else:
            rows = self.source.rows(round_, *self.stale.for_round(round_, self.state.step), *self.later(round_))
        if self.cfg.pipeline and round_ + 1 < self.cfg.iterations:  # its weights (round r+1−s ≤ r) exist already
            ahead = self.stale.sampled_by(round_ + 1)
            self.pending[round_ + 1] = sampler_thread.submit(
                self.source.rows, round_ + 1, self.stale.snapshots[ahead], self.stale.steps[ahead],
                *self.later(round_ + 1),
            )  # fmt: skip
        if round_ == self.state.round:
            warn_truncated_sampling(rows, self.objective, self.recipe.objective.name)
            if self.objective.couples_rows and (self.cfg.micro_batch_tokens or self.world.size > 1):
                warn(f"objective '{self.recipe.objective.name}' couples the rows of the batch it is given, so its "
                     "update depends on how a minibatch is cut into micro-batches and ranks; set "
                     "train.micro_batch_tokens=null and train in one process for its exact minibatch form")  # fmt: skip
        return rows

    def later(self, round_: int) -> tuple[list[LaterWeights], ...]:
        """`train.partial_rollout`: the newer weights round `round_`'s responses continue under
        (as an argument list: none without it). A pipelined round waits for the last of them."""
        partial = self.cfg.partial_rollout
        if partial is None:
            return ()
        segments = partial.sources(round_, self.cfg.staleness)[1:]
        return ([LaterWeights(at, functools.partial(self.stale.wait_for, source)) for at, source in segments],)

    def dedicated_rows(self, round_: int, sampler: DedicatedRounds) -> list[RolloutRow]:
        """Ask the dedicated sampler for the rounds it may sample now, then take this round's.
        Exact: rounds r … r + s, each with the weights of the round it samples from. Bounded:
        rounds up to ⌊k / steps per round⌋ ahead with the newest weights; a round more than k
        steps old is dropped and asked for again."""
        cfg, step, last = self.cfg, self.state.step, self.cfg.iterations - 1
        dtype = self.sampling_dtype or next(self.policy.model.parameters()).dtype  # what the sampler holds
        live = (lambda: (self.state.step, named_weights(self.policy.model, dtype, self.policy.adapters)),
                planned_bytes(self.policy.model, dtype))  # fmt: skip
        waited, dropped = 0.0, sampler.dropped
        if cfg.max_staleness is None:
            by_source: dict[int, list[int]] = {}
            for ahead in range(round_, min(round_ + cfg.staleness, last) + 1):
                by_source.setdefault(self.stale.sampled_by(ahead), []).append(ahead)
            if cfg.partial_rollout is not None:  # rounds sampled earlier switch to this round's weights
                by_source.setdefault(round_, [])
            for source, rounds in by_source.items():
                if not cfg.staleness:
                    sampler.ask(rounds, *live)
                    continue
                snapshot, version = self.stale.snapshots[source], self.stale.steps[source]
                sampler.ask(rounds, lambda w=snapshot, v=version: (v, w.items()), planned_bytes(snapshot), source)
            rows, waited = sampler.take(round_, self.stale.for_round(round_, step)[1])
        else:
            ahead = cfg.max_staleness // (cfg.epochs * cfg.minibatches)
            sampler.ask(list(range(round_, min(round_ + ahead, last) + 1)), *live)
            rows, waited = sampler.take(round_, None)
            while sampler.too_old(round_, rows, step):
                sampler.ask([round_], *live)
                rows, more = sampler.take(round_, None)
                waited += more
        self.sampler_metrics = {"sampler_wait_s": waited, "rounds_dropped": sampler.dropped - dropped}
        return rows

    def train_round(self, round_: int, sampler_thread: ThreadPoolExecutor) -> dict[str, Any]:
        """Sample (or take) the round's rows, update the policy on them, log the round."""
        started = time.perf_counter()
        rows = self.round_rows(round_, sampler_thread)
        batch = training_batch(rows, self.estimator, self.cfg.drop_zero_variance_groups)
        if batch is None or not bool(batch.advantages.ne(0).any()):
            warn(f"round {round_}: every group's responses got the same reward (every advantage is 0): "
                 f"{'no update' if batch is None else 'the policy-gradient term is 0'} this round")  # fmt: skip
        else:
            self.rounds_with_signal += 1
        step_metrics = [] if batch is None else self.update(round_, batch)
        self.stale.drop_before(round_ + 1)
        if self.cfg.partial_rollout and self.cfg.pipeline and round_ + 1 < self.cfg.iterations:
            # the pipelined round r+1 continues under these weights mid-way: publish them now, not
            # after the checkpoint and evaluation (which wait for the sampler)
            self.stale.take(round_ + 1, self.snapshot(), self.state.step)
        self.state.round = round_ + 1
        sampled_version = min(r.policy_version for r in rows)
        record = {
            "round": round_,
            "step": self.state.step,
            "policy_version": sampled_version,
            "staleness_steps": self.state.step - len(step_metrics) - sampled_version,
            "lr": self.optimizer.param_groups[0]["lr"],
            **summarize_rows(rows),
            "responses_trained": 0 if batch is None else len(batch.prompts),
            **reduce_metrics(step_metrics),
            **self.sampler_metrics,
            "time_s": time.perf_counter() - started,
        }
        if self.world.is_main:
            append_jsonl(self.metrics_path, record)
            self.trackers.log(record)
        return record

    def weights_of(self, version: int, current: StateDict) -> StateDict:
        """The whole weights of policy version `version`: the current ones, or a staleness snapshot."""
        if version == self.state.step:
            return current
        for round_, step in self.stale.steps.items():
            if step == version and round_ in self.stale.snapshots:
                return whole_state(self.stale.snapshots[round_])  # collective under FSDP2
        raise ConfigError(f"train.anchor=sampling_weights: the weights of policy_version {version} are no longer "
                          "held (a row older than train.staleness); use train.anchor=round_start")  # fmt: skip

    def rescore(self, batch: RolloutBatch) -> None:
        """Before the round's first update: the trainer's own log-probs under the round's starting
        weights and under the weights that sampled each row, where the anchor or metrics need them."""
        batch.trained_from = self.state.step
        if self.rescorer is None:
            return
        taken = self.stale.snapshots.get(self.state.round)  # staleness took the round's starting weights already
        current = whole_state(taken) if taken is not None else self.sampling_weights()  # collective under FSDP2

        def score(weights: StateDict, rows: list[int]) -> list[list[float]]:
            prompts, responses = [batch.prompts[i] for i in rows], [batch.responses[i] for i in rows]
            return self.rescorer.score(weights, prompts, responses, batch.temperature)  # type: ignore[union-attr]

        if "round_start" in self.needs:
            batch.scores["round_start"] = score(current, list(range(len(batch.prompts))))
        if "sampling_weights" in self.needs:  # each token under the weights that drew it
            scores: list[list[float]] = [[0.0] * len(r) for r in batch.responses]
            versions = batch.versions or [[0] * len(r) for r in batch.responses]
            for version in sorted({v for row in versions for v in row}):
                rows = [i for i, row in enumerate(versions) if version in row]
                if version == self.state.step and "round_start" in batch.scores:  # the same weights: no second forward
                    values = [batch.scores["round_start"][i] for i in rows]
                else:
                    values = score(self.weights_of(version, current), rows)
                for i, row in zip(rows, values):
                    scores[i] = [new if v == version else old for old, new, v in zip(scores[i], row, versions[i])]
            batch.scores["sampling_weights"] = scores

    def update(self, round_: int, batch: RolloutBatch) -> list[dict[str, float]]:
        """The round's optimizer steps; a non-finite loss or gradient leaves `diverged.json`."""
        recipe, cfg = self.recipe, self.cfg
        self.rescore(batch)
        try:
            return update_policy(
                self.trainee, self.optimizer, self.objective, batch, cfg.epochs, cfg.minibatches,
                recipe.optim.grad_clip, seed=recipe.seed * 100_003 + round_, before_step=self.count_step,
                length_budget=self.length_budget, penalties=self.penalties, off_policy=self.off_policy,
            )  # fmt: skip
        except TrainingDivergedError as exc:
            last = latest_checkpoint(self.run_dir)
            if self.world.is_main:
                record = {"round": round_, "step": self.state.step, "reason": str(exc)}
                write_json_atomic(self.run_dir / DIVERGED_FILE, record)
            raise TrainingDivergedError(
                f"round {round_}, step {self.state.step}: {exc} (objective '{recipe.objective.name}', "
                f"lr {recipe.optim.lr}); last good checkpoint: {last or 'none'}; "
                "lower optim.lr or raise the objective's clipping, then rerun to resume"
            ) from None

    def finish(self) -> Path:
        """Publish `final/`: the HF weights (and adapter) with the loop state."""
        final = self.run_dir / "final"
        if not self.rounds_with_signal and self.cfg.iterations > self.resumed_at:
            warn("no round of this run had a reward signal (in every group all responses scored alike): the "
                 "policy-gradient term was 0 throughout; check the verifier and the data, or raise group_size")  # fmt: skip
        whole = whole_weights(self.trainee.module)
        if self.world.is_main:

            def fill_final(tmp: Path) -> None:
                export_hf(self.policy, self.trainee.module, whole, tmp)
                write_loop_state(tmp, self.state)

            write_directory_atomic(final, fill_final)
            console.print(f"final weights: {final}")
        self.world.barrier()
        return final
