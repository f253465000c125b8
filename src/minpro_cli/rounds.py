"""Where each training round's rows come from, and the stale weights they are sampled with.

`OnlineRounds` samples round r with the weights of round r − staleness (the paper's off-policy
knob); `StoredRounds` replays a stored rollout set; `StaleWeights` keeps the snapshots and
their optimizer steps (the rows' `policy_version`) that staleness needs, and drops each once
no later round samples with it.
"""

from __future__ import annotations

import itertools
import random
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minpro_cli.checkpoints import StateDict
from minpro_cli.config import Recipe, dump_recipe
from minpro_cli.console import warn
from minpro_cli.distributed import SINGLE, World, whole_state
from minpro_cli.errors import RolloutFileError
from minpro_cli.modeling import Policy, model_fingerprint, tokenizer_fingerprint
from minpro_cli.rollouts import RolloutRow, check_token_ids, read_rollout_rows, read_rollouts, write_rollouts
from minpro_cli.rundir import ROLLOUTS_DIR
from minpro_cli.sampling import Plugins, VersionSchedule, load_split, sample_rows, sampling_job
from minpro_cli.tasks import Problem


@dataclass
class StaleWeights:
    """Round r samples with the weights taken at the start of round r − `staleness`, and its
    rows carry the optimizer step of those weights as their policy version. `steps` is the
    loop state's `snapshot_steps` (the same dict), so checkpoints save both together."""

    staleness: int
    snapshots: dict[int, StateDict] = field(default_factory=dict)  # round → whole weights at its start
    steps: dict[int, int] = field(default_factory=dict)  # round → the optimizer step of those weights
    # a pipelined round's later segments (train.partial_rollout) wait here for weights not yet taken
    published: threading.Condition = field(default_factory=threading.Condition, repr=False)
    abandoned: bool = False

    def take(self, round_: int, weights: StateDict, step: int) -> None:
        with self.published:
            self.snapshots[round_], self.steps[round_] = weights, step
            self.published.notify_all()

    def wait_for(self, round_: int) -> tuple[StateDict, int]:
        """Round `round_`'s starting weights and version, once the trainer has taken them."""
        with self.published:
            self.published.wait_for(lambda: round_ in self.snapshots or self.abandoned)
            if round_ not in self.snapshots:
                raise RuntimeError(f"training stopped before round {round_}'s weights were taken")
            return self.snapshots[round_], self.steps[round_]

    def abandon(self) -> None:
        """Training stopped: a sampler waiting for weights gives up."""
        with self.published:
            self.abandoned = True
            self.published.notify_all()

    def sampled_by(self, round_: int) -> int:
        return max(0, round_ - self.staleness)

    def for_round(self, round_: int, step: int) -> tuple[StateDict | None, int]:
        """The weights round `round_` samples with (None: the current ones) and their version."""
        if not self.staleness:
            return None, step
        source = self.sampled_by(round_)
        return self.snapshots.get(source), self.steps.get(source, step)

    def drop_before(self, round_: int) -> None:
        """Forget the snapshots no round from `round_` on samples with."""
        with self.published:
            for old in [r for r in self.snapshots if r < self.sampled_by(round_)]:
                self.snapshots.pop(old)
                self.steps.pop(old, None)


class OnlineRounds:
    """Round r samples `prompts_per_iteration` training problems with the weights of round
    r − staleness (the paper's off-policy knob) and stores them as parquet in the run dir.
    Under torchrun each rank samples its share of the problems and rank 0 writes them all."""

    def __init__(self, recipe: Recipe, policy: Policy, plugins: Plugins, run_dir: Path, world: World = SINGLE) -> None:
        """`policy` samples: a copy of the trained one when rounds sample with stale weights."""
        self.recipe, self.run_dir, self.world = recipe, run_dir, world
        self.problems_for = RoundProblems.of(recipe)
        self.stale_policy = policy
        self.job = sampling_job(recipe, self.stale_policy, plugins)

    def rows(self, round_: int, weights: StateDict | None, version: int,
             later: Sequence[LaterWeights] = ()) -> list[RolloutRow]:  # fmt: skip
        """`later`: newer weights the responses continue under mid-way (`train.partial_rollout`)."""
        path = round_file(self.run_dir, round_)
        self.load(weights, version)
        schedule = None
        if later:
            sources = [lambda: (weights, version), *(segment.fetch for segment in later)]
            schedule = VersionSchedule((0, *(segment.at for segment in later)), lambda i: self.load(*sources[i]()))
        if path.exists():  # written before an interruption: same weights and seed, reuse it
            rows = read_rollout_rows(path)
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
            schedule=schedule,
        )
        # every rank has checked `path` before rank 0 writes it; rows cross ranks as JSON records
        rows = mine if world.size == 1 else [
            RolloutRow.from_record(r) for r in world.gather([r.as_record() for r in mine])
        ]
        if world.is_main:
            write_rollouts(path, rows, dump_recipe(self.recipe))
        return rows

    def load(self, weights: StateDict | None, version: int) -> int:
        """Sample with `weights` (None: those already loaded) from now on; returns their version."""
        if weights is not None:  # whole: FSDP2 snapshots are gathered here (every rank samples each round)
            self.stale_policy.model.load_state_dict(whole_state(weights))
        return version

    def check_reused(self, path: Path, rows: list[RolloutRow], round_: int, version: int) -> None:
        """A round file is reused only if this run sampled it: the round's prompts, each
        `group_size` times, by the weights and tokenizer this round samples with."""
        policy = self.stale_policy
        check_round_file(path, rows, round_, {
            "prompts": round_prompts(self.problems_for(round_), self.recipe.train.group_size),
            "policy_version": {version},
            "model_fingerprint": {model_fingerprint(policy.model)},
            "tokenizer_fingerprint": {tokenizer_fingerprint(policy.tokenizer)},
        })  # fmt: skip


@dataclass(frozen=True)
class LaterWeights:
    """Weights a round's responses continue under from response token `at` on; `fetch` gives
    them whole with their version, waiting until the trainer has taken them."""

    at: int
    fetch: Callable[[], tuple[StateDict, int]]


def round_file(run_dir: Path, round_: int) -> Path:
    return run_dir / ROLLOUTS_DIR / f"round_{round_:05d}.parquet"


@dataclass
class RoundProblems:
    """Which training problems round r samples: deterministic passes over the training split,
    reshuffled each pass; no problem twice in a round (its two groups would be one, with
    repeated sample indices)."""

    problems: list[Problem]
    per_round: int
    seed: int

    @classmethod
    def of(cls, recipe: Recipe) -> RoundProblems:
        problems = load_split(recipe, "train")
        per_round = min(recipe.train.prompts_per_iteration, len(problems))
        if per_round < recipe.train.prompts_per_iteration:
            warn(f"train.prompts_per_iteration={recipe.train.prompts_per_iteration} exceeds the {len(problems)} "
                 f"training problems: each round takes every problem once")  # fmt: skip
        return cls(problems, per_round, recipe.seed)

    def __call__(self, round_: int) -> list[Problem]:
        start, out = round_ * self.per_round, []
        while len(out) < self.per_round:
            pass_index, offset = divmod(start + len(out), len(self.problems))
            order = list(range(len(self.problems)))
            random.Random(self.seed * 7919 + pass_index).shuffle(order)
            take = order[offset : offset + self.per_round - len(out)]
            out.extend(self.problems[i] for i in take)
        return out


def round_prompts(problems: list[Problem], group_size: int) -> Counter[str]:
    return Counter({p.id: group_size for p in problems})


def check_round_file(path: Path, rows: list[RolloutRow], round_: int, expected: dict[str, Any]) -> None:
    """Refuse a round file whose prompt counts (`prompts`) or column values (every other key of
    `expected`: the set of values the rows must have) are not what this round samples."""
    found: dict[str, Any] = {"prompts": Counter(r.prompt_id for r in rows)}
    found |= {key: {getattr(r, key) for r in rows} for key in expected if key != "prompts"}
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
        groups: dict[str, list[RolloutRow]] = {}
        seen: dict[tuple[str, int], int] = {}
        for index, row in enumerate(RolloutRow.from_table(table)):
            first = seen.setdefault((row.prompt_id, row.sample_index), index)
            if first != index:
                raise RolloutFileError(
                    f"{spec}: rows {first} and {index} are both prompt_id={row.prompt_id!r}, sample_index="
                    f"{row.sample_index}: a response given twice would train with double weight; drop the duplicate "
                    "(several rounds of one run: train on one round's file at a time)"
                )
            groups.setdefault(row.prompt_id, []).append(row)
        per_round = recipe.train.prompts_per_iteration
        ordered = list(groups.values())
        self.chunks = [list(itertools.chain(*ordered[i : i + per_round])) for i in range(0, len(ordered), per_round)]

    def rows(self, round_: int, weights: StateDict | None, version: int) -> list[RolloutRow]:
        return self.chunks[round_ % len(self.chunks)]
