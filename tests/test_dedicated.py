"""sampler.options.placement=dedicated: a sampler process samples rounds ahead of the trainer,
exact (train.staleness) or bounded (train.max_staleness), and survives either side's SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

import minpro_cli.train as train_module
from minpro_cli.config import load_recipe
from minpro_cli.dedicated import DedicatedRounds
from minpro_cli.errors import ConfigError
from minpro_cli.modeling import load_policy
from minpro_cli.rounds import round_file
from minpro_cli.rundir import MARKER, SAMPLER_LOG
from minpro_cli.train import run_train
from minpro_cli.weightsync import PREFIX, alive, shm_directory

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
LIMIT_S = int(os.environ.get("MINPRO_TEST_DEDICATED_LIMIT_S", "600"))
SMALL = [
    "sampler.options.max_new_tokens=40", "train.prompts_per_iteration=4", "train.group_size=4", "train.iterations=4",
    "train.checkpoint_every=1", "train.minibatches=2", "optim.lr=1e-4", "optim.warmup_steps=0",
]  # fmt: skip


@pytest.fixture(autouse=True)
def bounded_wait():
    """A trainer waits for its sampler without a time limit; a test that would wait forever fails."""

    def expire(signum, frame):
        raise TimeoutError(f"no round after {LIMIT_S} s: the trainer is waiting for a sampler that will not write it")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(LIMIT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def dedicated(run_dir: Path, *extra: str) -> list[str]:
    # the sampler process samples with as many threads as this one: the same floating-point sums
    return [f"run_dir={run_dir}", *SMALL, "sampler.options.placement=dedicated",
            f"sampler.options.threads={torch.get_num_threads()}", *extra]  # fmt: skip


def metrics_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def rounds_of(run_dir: Path) -> list:
    return [pq.read_table(round_file(run_dir, r)) for r in range(4)]


def test_exact_staleness_gives_the_pipelines_run_even_when_the_sampler_is_killed(tmp_path, monkeypatch):
    """Staleness 2: the dedicated sampler's round files, the metrics and the final weights equal
    train.pipeline's for the same seed, although its process was SIGKILLed before round 0."""
    pipelined = run_train(load_recipe(QUICKSTART, [f"run_dir={tmp_path / 'p'}", *SMALL, "train.staleness=2",
                                                   "train.pipeline=true"]))  # fmt: skip
    real_take, real_start, kills, starts = DedicatedRounds.take, DedicatedRounds.start, [], []

    def take(self, round_, expected_version):
        if not kills:  # the sampler is still starting: every round it was given is owed again
            kills.append(self.process.pid)
            os.kill(self.process.pid, signal.SIGKILL)
        return real_take(self, round_, expected_version)

    def start(self):
        starts.append(sorted(self.owed))
        real_start(self)

    monkeypatch.setattr(DedicatedRounds, "take", take)
    monkeypatch.setattr(DedicatedRounds, "start", start)
    final = run_train(load_recipe(QUICKSTART, dedicated(tmp_path / "d", "train.staleness=2")))
    assert starts == [[0, 1, 2], [0, 1, 2]]  # started again, owing rounds 0-2
    assert all(a.equals(b) for a, b in zip(rounds_of(tmp_path / "p"), rounds_of(tmp_path / "d")))
    weights, weights_d = load_file(str(pipelined / "model.safetensors")), load_file(str(final / "model.safetensors"))
    assert all(torch.equal(weights[k], weights_d[k]) for k in weights)
    drop = {"time_s", "sampler_wait_s", "rounds_dropped"}
    assert [{k: v for k, v in m.items() if k not in drop} for m in metrics_of(tmp_path / "p")] == [
        {k: v for k, v in m.items() if k not in drop} for m in metrics_of(tmp_path / "d")
    ]
    assert [m["staleness_steps"] for m in metrics_of(tmp_path / "d")] == [0, 2, 4, 4]
    assert not list(shm_directory().glob(f"{PREFIX}{os.getpid()}-*"))  # every segment freed


def test_bounded_staleness_never_trains_a_round_older_than_k(tmp_path):
    """max_staleness k, 2 steps a round: rounds are asked for ⌊k/2⌋ ahead with the newest weights.
    A round file older than k steps when its training starts (planted from a k=4 run) is moved
    to rollouts/dropped/, counted, and sampled again with the newest weights."""
    loose = tmp_path / "k4"
    run_train(load_recipe(QUICKSTART, dedicated(loose, "train.max_staleness=4")))
    assert [m["staleness_steps"] for m in metrics_of(loose)] == [0, 2, 4, 4]  # round 2 asked at round 0, v0
    assert [t["policy_version"][0].as_py() for t in rounds_of(loose)] == [0, 0, 0, 2]

    tight = tmp_path / "k2"
    (tight / "rollouts").mkdir(parents=True)
    (tight / MARKER).write_text("{}")
    shutil.copy(round_file(loose, 2), round_file(tight, 2))  # sampled with version 0, trained at step 4
    run_train(load_recipe(QUICKSTART, dedicated(tight, "train.max_staleness=2")))
    metrics = metrics_of(tight)
    assert [m["staleness_steps"] for m in metrics] == [0, 2, 0, 2]
    assert [m["rounds_dropped"] for m in metrics] == [0, 0, 1, 0]
    assert all(m["staleness_steps"] <= 2 for m in metrics)
    assert [t["policy_version"][0].as_py() for t in rounds_of(tight)] == [0, 0, 4, 4]
    dropped = tight / "rollouts" / "dropped" / "round_00002-v0.parquet"
    assert pq.read_table(dropped).equals(pq.read_table(round_file(loose, 2)))  # moved away, not lost
    assert (tight / SAMPLER_LOG).read_text().rstrip().endswith("stopped by the trainer")  # asked to, not killed


def test_the_drop_rule_is_more_than_k_steps(tmp_path):
    recipe = load_recipe(QUICKSTART, dedicated(tmp_path, "train.max_staleness=3"))
    rounds = DedicatedRounds(recipe, load_policy("embedded"), tmp_path)
    path = round_file(tmp_path, 5)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"rows")
    assert not rounds.too_old(5, [SimpleNamespace(policy_version=7), SimpleNamespace(policy_version=9)], step=10)
    assert rounds.too_old(5, [SimpleNamespace(policy_version=6), SimpleNamespace(policy_version=9)], step=10)
    assert not path.exists() and (path.parent / "dropped" / "round_00005-v6.parquet").read_bytes() == b"rows"
    assert rounds.dropped == 1


def test_a_killed_trainer_takes_its_sampler_along_and_the_rerun_resumes(tmp_path):
    """SIGKILL the trainer after two rounds: its sampler goes too. The rounds not yet trained are
    removed (as if the sampler had not written them): the rerun resumes from the checkpoint and
    has them sampled with the checkpoint's stale snapshots, not with its current weights."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "minpro_cli", "train", str(QUICKSTART), *dedicated(run, "train.staleness=2")]
    trainer = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not ((run / "metrics.jsonl").exists() and len(metrics_of(run)) >= 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    trainer.kill()
    trainer.wait()
    sampler = int((run / SAMPLER_LOG).read_text().split("dedicated sampler: pid ")[1].split(",")[0])
    while alive(sampler) and time.monotonic() < deadline:  # PR_SET_PDEATHSIG: it goes with the trainer
        time.sleep(0.1)
    assert not alive(sampler)
    for round_ in range(2, 4):
        round_file(run, round_).unlink(missing_ok=True)
    again = subprocess.run(command, check=False, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming from" in again.stdout + again.stderr
    assert not list(shm_directory().glob(f"{PREFIX}{trainer.pid}-*"))  # what the killed trainer left is gone
    assert [m["round"] for m in metrics_of(run)] == [0, 1, 2, 3]
    assert [t["policy_version"][0].as_py() for t in rounds_of(run)] == [0, 0, 0, 2]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["train.max_staleness=2"], "train.max_staleness .* needs .*placement=dedicated"),
        (["sampler.options.placement=dedicated", "train.staleness=1", "train.pipeline=true"], "drop train.pipeline"),
    ],
)
def test_placement_refusals(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        train_module.check_placement(load_recipe(QUICKSTART, [f"run_dir={tmp_path}", *extra]))


def test_bounded_and_exact_staleness_are_one_knob(tmp_path):
    with pytest.raises(ConfigError, match="two semantics of one knob"):
        load_recipe(QUICKSTART, [f"run_dir={tmp_path}", "train.staleness=1", "train.max_staleness=2"])


def test_partial_rollouts_in_the_dedicated_sampler_give_the_inline_run(tmp_path):
    """train.partial_rollout with a dedicated sampler: rounds sampled ahead wait there for the
    newer weights they switch to, and the run is the inline run of the same seed, bit for bit
    (round files, with their per-token versions, and final weights)."""
    partial = ["train.staleness=2", "train.partial_rollout={switch_at: [3, 6]}"]
    inline = run_train(load_recipe(QUICKSTART, [f"run_dir={tmp_path / 'i'}", *SMALL, *partial]))
    final = run_train(load_recipe(QUICKSTART, dedicated(tmp_path / "d", *partial)))
    assert all(a.equals(b) for a, b in zip(rounds_of(tmp_path / "i"), rounds_of(tmp_path / "d")))
    versions = {v for t in rounds_of(tmp_path / "d") for row in t["behavior_versions"].to_pylist() for v in row}
    assert versions == {0, 2, 4, 6}  # two optimizer steps a round: rounds 0-3 start at steps 0, 2, 4, 6
    weights, weights_d = load_file(str(inline / "model.safetensors")), load_file(str(final / "model.safetensors"))
    assert all(torch.equal(weights[k], weights_d[k]) for k in weights)
