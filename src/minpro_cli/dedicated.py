"""`sampler.options.placement: dedicated`: a sampler process of its own samples rounds ahead
while `minpro train` trains, with exact or bounded staleness.

The hand-over is the run directory: the trainer writes a request per weights version into
`sampler/` (`request-000003.json`: the version, the rounds to sample with it, and the table of
a shared-memory segment holding those weights, `weightsync`), the sampler loads the weights,
acknowledges (`ack.json`, so the trainer frees the segment) and writes each round as
`rollouts/round_00007.parquet`, the same files `minpro train` writes inline (atomic, so an
interrupted run resumes from them). Requests are numbered from 0 for each sampler process;
the sampler serves them in order, and stops at a request that says so.

Staleness (`s`, train.staleness) is exact: round r samples with the weights round r − s
started from, so for the same seed the round files equal `train.pipeline`'s, and the sampler
runs at most s rounds ahead. Bounded (`k`, train.max_staleness): a round samples with the
newest weights at the time it is requested, rounds are requested up to ⌊k / steps per
round⌋ ahead, and a round whose weights are more than k steps old when its training starts
is dropped (moved to `rollouts/dropped/`), counted, and requested again with the newest.

With `train.partial_rollout` (exact staleness only) each request also names the round whose
starting weights it carries (`source`); a round's responses switch mid-way to the weights of
newer sources, which the sampler takes from the requests that carry them, waiting for the
trainer to send them if need be, and keeps until no round it still owes needs them.

A sampler process that dies is started again and given the rounds it owed; it dies with the
trainer (PR_SET_PDEATHSIG), and a rerun of the trainer resumes from its checkpoint and the
round files already written.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minpro_cli.config import Recipe, load_recipe
from minpro_cli.console import console, warn
from minpro_cli.errors import DIE_WITH_PARENT, MinproError
from minpro_cli.fileio import remove, write_json_atomic
from minpro_cli.modeling import Policy, tokenizer_fingerprint
from minpro_cli.rollouts import RolloutRow, read_rollout_rows
from minpro_cli.rounds import LaterWeights, OnlineRounds, RoundProblems, check_round_file, round_file, round_prompts
from minpro_cli.rundir import SAMPLER_DIR, SAMPLER_LOG
from minpro_cli.sampling import Plugins, load_recipe_policy
from minpro_cli.weightsync import WeightSegment, read_weights

ACK = "ack.json"
POLL_S = 0.02
RESTARTS = 3  # a sampler that dies this many times without writing a round is an error, not bad luck
STOP_S = 10.0  # how long a sampler asked to stop may take before it is terminated
# a request's weights, streamed anew each time it is sent: (their version, named tensors)
Weights = Callable[[], tuple[int, Iterable[tuple[str, torch.Tensor]]]]


def request_path(channel: Path, seq: int) -> Path:
    return channel / f"request-{seq:06d}.json"


@dataclass
class Request:
    rounds: list[int]
    weights: Weights
    nbytes: int  # what the weights take in the segment
    source: int | None = None  # exact staleness: the round whose starting weights these are


class DedicatedRounds:
    """The trainer's side: ask for rounds, hand over their weights, wait for the files."""

    def __init__(self, recipe: Recipe, policy: Policy, run_dir: Path) -> None:
        self.recipe, self.run_dir, self.cfg = recipe, run_dir, recipe.train
        self.problems_for = RoundProblems.of(recipe)
        self.tokenizer = tokenizer_fingerprint(policy.tokenizer)
        self.channel = run_dir / SAMPLER_DIR
        self.owed: dict[int, Request] = {}  # round → the request that asks for it, until its file is taken
        self.carriers: dict[int, Request] = {}  # partial rollouts: source round → the request with its weights
        self.segments: dict[int, WeightSegment] = {}  # request seq → its weights, until acknowledged
        self.process: subprocess.Popen[bytes] | None = None
        self.seq, self.deaths, self.dropped = 0, 0, 0

    def start(self) -> None:
        """A new sampler process, with every round still owed requested again."""
        self.close_segments()
        remove(self.channel)
        self.channel.mkdir(parents=True)
        self.seq = 0
        options = self.recipe.sampler.options
        env = dict(os.environ) | {DIE_WITH_PARENT: str(os.getpid())}
        if options.get("threads"):  # torch reads these at import
            env |= {"OMP_NUM_THREADS": str(options["threads"]), "MKL_NUM_THREADS": str(options["threads"])}
        with open(self.run_dir / SAMPLER_LOG, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "minpro_cli", "sample-driver", str(self.run_dir)],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        again = {id(r): r for r in [*self.owed.values(), *self.carriers.values()]}.values()
        for request in sorted(again, key=lambda r: min(r.rounds) if r.source is None else r.source):
            self.send(request)

    def ask(self, rounds: list[int], weights: Weights, nbytes: int, source: int | None = None) -> None:
        """Have `rounds` (those without a file or a request) sampled with these weights (round
        `source`'s starting weights, under exact staleness). With `train.partial_rollout`, a
        source's weights are sent even when none of its rounds is left: newer rounds switch to them."""
        rounds = [r for r in rounds if r not in self.owed and not round_file(self.run_dir, r).exists()]
        carried = self.cfg.partial_rollout is not None and source is not None and source not in self.carriers
        if rounds or carried:
            request = Request(rounds, weights, nbytes, source)
            self.owed |= dict.fromkeys(rounds, request)
            if carried:
                self.carriers[source] = request  # type: ignore[index]
            if self.process is None:
                self.start()  # sends what is owed
            else:
                self.send(request)

    def send(self, request: Request) -> None:
        segment = WeightSegment()
        version, weights = request.weights()
        segment.write(weights, version, request.nbytes)
        self.segments[self.seq] = segment
        write_json_atomic(request_path(self.channel, self.seq), {"rounds": request.rounds, "version": version,
                          "table": str(segment.table), "source": request.source})  # fmt: skip
        self.seq += 1

    def take(self, round_: int, expected_version: int | None) -> tuple[list[RolloutRow], float]:
        """Round `round_`'s rows once the sampler has written them (or an earlier attempt did),
        and the seconds spent waiting. `expected_version`: exact staleness's version (None: bounded)."""
        path, started = round_file(self.run_dir, round_), time.perf_counter()
        while not path.exists():
            self.wait_a_moment()
        rows = read_rollout_rows(path)
        expected: dict[str, Any] = {
            "prompts": round_prompts(self.problems_for(round_), self.cfg.group_size),
            "tokenizer_fingerprint": {self.tokenizer},
        }
        if expected_version is not None:
            expected["policy_version"] = {expected_version}
        check_round_file(path, rows, round_, expected)
        self.owed.pop(round_, None)
        for source in [s for s in self.carriers if s < round_ + 1 - self.cfg.staleness]:  # no later round needs it
            del self.carriers[source]
        self.deaths = 0
        return rows, time.perf_counter() - started

    def too_old(self, round_: int, rows: list[RolloutRow], step: int) -> bool:
        """Bounded staleness: move a round sampled more than k steps ago out of the way."""
        lag = step - min(r.policy_version for r in rows)
        if self.cfg.max_staleness is None or lag <= self.cfg.max_staleness:
            return False
        path = round_file(self.run_dir, round_)
        dropped = path.parent / "dropped" / f"{path.stem}-v{min(r.policy_version for r in rows)}.parquet"
        dropped.parent.mkdir(exist_ok=True)
        os.replace(path, dropped)
        self.dropped += 1
        return True

    def wait_a_moment(self) -> None:
        """Free acknowledged weights; start the sampler again if it died."""
        self.free_acknowledged()
        assert self.process is not None, "a round was waited for before it was asked for"
        if self.process.poll() is not None:
            self.deaths += 1
            if self.deaths >= RESTARTS:
                lines = (self.run_dir / SAMPLER_LOG).read_text(errors="replace").strip().splitlines() or ["nothing"]
                raise MinproError(
                    f"the dedicated sampler exited {self.deaths} times without writing a round (exit code "
                    f"{self.process.returncode}, last said: {lines[-1].strip()}); its output is in "
                    f"{self.run_dir / SAMPLER_LOG}"
                )
            warn(f"the dedicated sampler exited (code {self.process.returncode}); starting it again")
            self.start()
        time.sleep(POLL_S)

    def free_acknowledged(self) -> None:
        try:
            done = json.loads((self.channel / ACK).read_text())["seq"]
        except FileNotFoundError:
            return
        for seq in [s for s in self.segments if s <= done]:
            self.segments.pop(seq).close()

    def close_segments(self) -> None:
        for segment in self.segments.values():
            segment.close()
        self.segments.clear()

    def close(self) -> None:
        """Ask the sampler to stop (it does once its requests are served), else terminate it."""
        if self.process is not None and self.process.poll() is None:
            write_json_atomic(request_path(self.channel, self.seq), {"stop": True})
            try:
                self.process.wait(timeout=STOP_S)
            except subprocess.TimeoutExpired:
                self.process.terminate()
                try:
                    self.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.process.kill()
        self.close_segments()


class Requests:
    """The sampler's side of the channel: request `seq`, once the trainer has written it, its
    weights copied out of the shared segment (then acknowledged, so the trainer frees it): into
    the policy, or, for partial rollouts (`keep`), into a copy a later round may switch to."""

    def __init__(self, channel: Path, policy: Policy, keep: bool) -> None:
        self.channel, self.policy, self.keep = channel, policy, keep
        self.read: dict[int, dict[str, Any]] = {}  # seq → the request, its weights loaded
        self.acked = -1

    def __getitem__(self, seq: int) -> dict[str, Any]:
        for k in range(self.acked + 1, seq + 1):  # in order: the acknowledgement covers all before it
            path = request_path(self.channel, k)
            while not path.exists():
                time.sleep(POLL_S)
            request = json.loads(path.read_text())
            if not request.get("stop"):
                request["version"], weights = read_weights(request["table"])
                if self.keep:
                    request["weights"] = {name: t.clone() for name, t in weights}
                else:  # served in order: straight into the policy, no copy held beside it
                    self.policy.model.load_state_dict(dict(weights))
                    request["weights"] = None
                write_json_atomic(self.channel / ACK, {"seq": k})
            self.read[k], self.acked = request, k
        return self.read[seq]

    def weights_of(self, source: int, after: int) -> tuple[dict[str, torch.Tensor], int]:
        """Round `source`'s starting weights and version, from the first request after `after`
        that carries them (waiting for the trainer to send it)."""
        k = after + 1
        while self[k].get("source") != source:
            if self[k].get("stop"):
                raise MinproError(f"the trainer stopped before it sent round {source}'s weights")
            k += 1
        return self[k]["weights"], self[k]["version"]

    def forget_before(self, seq: int) -> None:
        for k in [k for k in self.read if k < seq]:
            del self.read[k]


def serve(run_dir: Path) -> None:
    """The sampler process (`minpro sample-driver RUN_DIR`): serve the trainer's requests in
    order, for as long as it lives."""
    recipe = load_recipe(run_dir / "config.yaml")
    device = recipe.sampler.options.get("device")
    if device:
        recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"device": device})})
    policy, plugins = load_recipe_policy(recipe), Plugins.of(recipe)
    held = getattr(plugins.sampler, "weights_dtype", None)
    if held is not None:  # the sampler's precision is all this process needs: no float32 copy beside it
        policy.model.to(held)
    rounds = OnlineRounds(recipe, policy, plugins, run_dir)
    partial = recipe.train.partial_rollout
    requests, seq = Requests(run_dir / SAMPLER_DIR, policy, keep=partial is not None), 0
    console.print(f"dedicated sampler: pid {os.getpid()}, {torch.get_num_threads()} threads, {recipe.model.device}")
    while True:
        request = requests[seq]
        if request.get("stop"):
            console.print("dedicated sampler: stopped by the trainer")
            return
        weights, version = request.pop("weights"), request["version"]
        for round_ in request["rounds"]:  # a file an earlier sampler wrote is checked and kept
            later = [] if partial is None else [
                LaterWeights(at, functools.partial(requests.weights_of, source, seq))
                for at, source in partial.sources(round_, recipe.train.staleness)[1:]
            ]  # fmt: skip
            rounds.rows(round_, weights, version, later)
        requests.forget_before(seq + 1)
        seq += 1

