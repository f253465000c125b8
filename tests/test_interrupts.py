"""`minpro train` stopped at random moments and rerun ends exactly where an uninterrupted run
ends: SIGKILL (no clean-up code runs at all) at ≥ 10 seeded random moments, and Ctrl-C (SIGINT),
SIGTERM and SIGHUP (what schedulers send on preemption), which must also exit 128 + signal with
one line and leave nothing half-written. `rollout` and `eval` interrupted leave no output
either, and a `sweep` stopped by SIGTERM or SIGKILL leaves no run training on.

The moments are events, not times (a busy machine shifts times, not events): each attempt
picks one of the next round's writes (its rollout file, its metrics line, its checkpoint, a
held-out evaluation) and the signal goes out the moment it appears, so they land in sampling,
updates, file writes and evaluations whatever the machine's speed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
ROUNDS = 10
RUN = [
    f"train.iterations={ROUNDS}", "train.prompts_per_iteration=4", "train.group_size=4", "train.staleness=1",
    "sampler.options.max_new_tokens=24", "train.checkpoint_every=1", "train.keep_checkpoints=1",
    "optim.warmup_steps=0", "optim.lr=1e-3", "train.eval_every=4", "eval.max_problems=4", "eval.n_samples=1",
    "eval.k=[1]",
]  # fmt: skip
KILLS = 6


def start(*args: str) -> subprocess.Popen[str]:
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # a shell that starts the suite in the background ignores SIGINT and children inherit that;
        # a handler here becomes the default disposition in the child, which Python turns into
        # KeyboardInterrupt
        signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):  # ignored when the suite runs under nohup: children would inherit it
        if signal.getsignal(sig) is signal.SIG_IGN:
            signal.signal(sig, signal.SIG_DFL)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "COLUMNS": "300"}
    return subprocess.Popen(
        [sys.executable, "-m", "minpro_cli", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip


def train_args(run_dir: Path) -> list[str]:
    return ["train", str(QUICKSTART), f"run_dir={run_dir}", *RUN]


def wait_for_training(job: subprocess.Popen[str], run_dir: Path, since_ns: int) -> bool:
    """Until this attempt rewrote config.yaml (its inputs are checked); False if it ended first."""
    config = run_dir / "config.yaml"
    while job.poll() is None:
        if config.exists() and config.stat().st_mtime_ns >= since_ns:
            return True
        time.sleep(0.005)
    return False


@dataclass(frozen=True)
class Straight:
    run_dir: Path


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Straight:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    job = start(*train_args(run_dir))
    output, _ = job.communicate(timeout=600)
    assert job.returncode == 0, output
    return Straight(run_dir)


def lines_in(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def next_event(run_dir: Path, rng: random.Random) -> Callable[[], bool]:
    """One of the writes still to come in the round after those already logged (or the one after
    it), as a test of whether it has happened: the round's rollout file appears, its metrics
    line, its checkpoint, the next held-out evaluation line."""
    done = lines_in(run_dir / "metrics.jsonl")
    target = min(done + rng.randint(0, 1), ROUNDS - 1)
    evals = lines_in(run_dir / "evals.jsonl")
    events = [
        lambda: (run_dir / "rollouts" / f"round_{target:05d}.parquet").exists(),
        lambda: (run_dir / "checkpoints" / f"round_{target + 1:05d}").exists(),
        *([lambda: lines_in(run_dir / "evals.jsonl") > evals] if evals < 4 else []),  # 4 evaluations in all
    ]
    to_come = [event for event in events if not event()]
    return rng.choice([*to_come, lambda: lines_in(run_dir / "metrics.jsonl") > target])


def assert_same_run(straight: Straight, run_dir: Path) -> None:
    rounds = [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rounds == list(range(ROUNDS))  # every round exactly once
    evals = [json.loads(line)["round"] for line in (run_dir / "evals.jsonl").read_text().splitlines()]
    assert evals == [0, 4, 8, 10]
    expected = load_file(straight.run_dir / "final" / "model.safetensors")
    found = load_file(run_dir / "final" / "model.safetensors")
    assert sorted(found) == sorted(expected)
    for name in expected:
        assert torch.equal(found[name], expected[name]), name  # bit for bit
    assert not [p for p in run_dir.rglob(".*") if p.name.endswith((".tmp", ".partial", ".old"))]


def interrupted_until_done(run_dir: Path, signals: list[int], seed: int) -> list[tuple[int, str]]:
    """Rerun `minpro train` until it finishes, sending the next of `signals` at a random event of
    each of the first attempts; return the signal and output of every interrupted attempt."""
    rng = random.Random(seed)
    outputs: list[tuple[int, str]] = []
    for _ in range(len(signals) + 30):
        began = time.time_ns()
        happened = next_event(run_dir, rng)
        job = start(*train_args(run_dir))
        if len(outputs) < len(signals) and wait_for_training(job, run_dir, began):
            while job.poll() is None and not happened():
                time.sleep(0.002)
            if job.poll() is None:
                sig = signals[len(outputs)]
                job.send_signal(sig)
                output, _ = job.communicate(timeout=120)
                if job.returncode != 0:  # 0: it finished before the signal was handled
                    assert job.returncode == (128 + sig if sig != signal.SIGKILL else -sig), output
                    outputs.append((sig, output))
                    continue
        output, _ = job.communicate(timeout=600)
        assert job.returncode == 0, output
        if (run_dir / "final").is_dir():
            return outputs
    raise AssertionError("the run did not finish")


def test_sigkill_at_random_moments_then_rerun_gives_the_uninterrupted_run(tmp_path, straight):
    run_dir = tmp_path / "run"
    killed = interrupted_until_done(run_dir, [signal.SIGKILL] * KILLS, seed=0)
    assert len(killed) == KILLS
    assert_same_run(straight, run_dir)


SAID = {signal.SIGINT: "interrupted:", signal.SIGTERM: "interrupted by SIGTERM:", signal.SIGHUP: "interrupted by SIGHUP:"}


def test_ctrl_c_sigterm_and_sighup_at_random_moments_exit_with_one_line_and_resume(tmp_path, straight):
    """Ctrl-C, a scheduler's SIGTERM and a closed terminal's SIGHUP: exit 130 / 143 / 129."""
    run_dir = tmp_path / "run"
    signals = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGTERM]
    outputs = interrupted_until_done(run_dir, signals, seed=2)
    assert [sig for sig, _ in outputs] == signals
    for sig, output in outputs:
        assert "Traceback" not in output, output
        lines = [line for line in output.splitlines() if line.startswith("interrupted")]
        assert len(lines) == 1 and lines[0].startswith(SAID[sig]), output
        assert "rerun the same command to resume" in lines[0] and "checkpoint" in lines[0], output
    assert_same_run(straight, run_dir)


@pytest.mark.parametrize("stage", ["rollout", "eval"])
def test_ctrl_c_during_rollout_or_eval_leaves_no_output(tmp_path, stage):
    run_dir = tmp_path / "run"
    many = ["rollout.num_prompts=2000", "rollout.group_size=8", "eval.max_problems=500", "eval.n_samples=32",
            "eval.k=[1]"]  # minutes of sampling either way
    job = start(stage, str(QUICKSTART), f"run_dir={run_dir}", *many)
    while job.poll() is None and not (run_dir / ".minpro-run").exists():  # the stage has claimed the directory
        time.sleep(0.01)
    time.sleep(0.5)  # on into loading or sampling: wherever it lands, nothing may be left
    assert job.poll() is None, job.communicate()[0]
    job.send_signal(signal.SIGINT)
    output, _ = job.communicate(timeout=120)
    assert job.returncode == 130, output
    assert "Traceback" not in output
    assert len([line for line in output.splitlines() if line.startswith("interrupted:")]) == 1, output
    written = [p for p in run_dir.rglob("*") if p.is_file() and p.name not in {".minpro-run", ".minpro-lock"}]
    assert written == []
