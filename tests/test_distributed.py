"""Training under torchrun: N gloo ranks on CPU take the update one process takes.

Tolerance: the ranks' loss shares and gradients are summed in another order than one
process sums them, so float32 results differ by rounding only: the first step's loss agrees
to ~1e-9, weights after 4 steps to ~5e-7. The tests allow 1e-6 on losses (absolute: a
GRPO loss is a small difference of large terms), 1e-5 relative on gradient norms and
entropy and 1e-5 on weights; ten times that after the 24 steps of the resume test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minpro_cli.config import load_recipe
from minpro_cli.distributed import World, reduce_step_metrics
from minpro_cli.objectives import MinibatchCounts, Objective, minibatch_counts
from minpro_cli.rollout import run_rollout
from minpro_cli.rollouts import read_rollouts
from minpro_cli.train import run_train

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
LR = 1e-4  # SMALL's learning rate: it also bounds how far AdamW can move one element
SMALL = [
    "rollout.num_prompts=8", "rollout.group_size=4", "sampler.options.max_new_tokens=40",
    "train.prompts_per_iteration=3", "train.minibatches=2", "train.checkpoint_every=1",
    f"optim.lr={LR}", "optim.warmup_steps=0",
]  # fmt: skip


@pytest.mark.parametrize(
    "options",
    [
        {"loss_agg": "token-mean"},
        {"loss_agg": "seq-mean-token-mean"},
        {"loss_agg": "seq-mean-token-sum"},
        {"loss_agg": "seq-mean-token-sum-norm"},
        {"loss_agg": "seq-mean-token-sum-norm", "max_response_length": 9},
    ],
)
def test_shares_normalised_by_the_minibatch_counts_sum_to_the_whole_batch_loss(options):
    torch.manual_seed(0)
    lengths = [5, 1, 7, 3, 0, 6, 2]  # one row with no trained token
    per_token = torch.randn(len(lengths), 7, dtype=torch.float64)
    mask = torch.arange(7).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    objective = Objective(**options)
    whole = objective.aggregate(per_token, mask)
    # three shares (micro-batches or ranks), each padded only to its own longest response, as `pack` does
    shards = [slice(0, 2), slice(2, 5), slice(5, 7)]
    widths = [max(max(lengths[s]), 1) for s in shards]
    with minibatch_counts(MinibatchCounts.of_lengths(lengths)):
        total = sum(objective.aggregate(per_token[s, :w], mask[s, :w]) for s, w in zip(shards, widths))
    assert float(total) == pytest.approx(float(whole), rel=1e-12)
    alone = sum(objective.aggregate(per_token[s, :w], mask[s, :w]) for s, w in zip(shards, widths))
    assert float(alone) != pytest.approx(float(whole), rel=1e-6)  # without the counts, the shares do not add up


class GatheredWorld(World):
    def gather(self, items):  # what the other rank sent, then ours
        return [[{"ratio_mean": 3.0, "ratio_min": 0.1, "ratio_max": 2.0, "kl": float("nan")}, 3.0], *items]


def test_step_metrics_are_token_weighted_across_ranks():
    mine = {"ratio_mean": 1.0, "ratio_min": 0.5, "ratio_max": 4.0, "kl": 0.2}
    out = reduce_step_metrics(mine, 1.0, GatheredWorld(rank=1, size=2))
    assert out == {"kl": 0.2, "ratio_max": 4.0, "ratio_mean": (3.0 * 3 + 1.0 * 1) / 4, "ratio_min": 0.1}
    assert reduce_step_metrics(mine, 1.0, World()) is mine


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("rollouts")
    return run_rollout(load_recipe(QUICKSTART, [f"run_dir={run_dir}", *SMALL]))


def minpro_train(run_dir: Path, *overrides: str, nproc: int = 2, tag: str = "") -> subprocess.Popen:
    env = {**os.environ, "MINPRO_TEST_TAG": tag, "COLUMNS": "1000"}  # rich must not wrap the paths
    command = [sys.executable, "-m", "minpro_cli", "train", str(QUICKSTART), f"run_dir={run_dir}", *SMALL, *overrides]
    return subprocess.Popen(
        [*command, f"--nproc={nproc}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_training(one: Path, two: Path, slack: float = 1.0) -> None:
    """Same metrics and weights within the module's tolerances, times `slack` for long runs."""
    a, b = metrics(one), metrics(two)
    assert [m["round"] for m in a] == [m["round"] for m in b]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-6 * slack)
        # rel 1e-4: after the first step, the few elements AdamW moved apart (below) move the norm
        # by ~1e-5; a normaliser off by one rank's share moves it by percents
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4 * slack)
        assert y["entropy"] == pytest.approx(x["entropy"], rel=1e-5 * slack)  # a token mean: exact up to rounding
        assert y["responses_trained"] == x["responses_trained"]
    wa, wb = load_file(str(one / "final" / "model.safetensors")), load_file(str(two / "final" / "model.safetensors"))
    assert sorted(wa) == sorted(wb)
    base = load_file(str(QUICKSTART.parents[1] / "src/minpro_cli/assets/default_model/model.safetensors"))
    assert any((wa[k] - base[k]).abs().max() > 1e-4 for k in wa)  # training moved the weights
    # AdamW divides each update by √v: an element whose gradient is rounding noise can step either
    # way by up to about lr, whatever the tolerance (seen once in 49k elements on an AVX-512 EPYC:
    # 1.9e-5 against lr 1e-4). So a few elements in 10,000 may differ by up to 2·lr per step; the
    # rest within the tolerance. A wrong normaliser moves every element, and the loss and the
    # gradient norm above.
    adam_bound = 2 * LR * max(m["step"] for m in a)
    for name in wa:
        gap = (wb[name] - wa[name]).abs()
        off = int((gap > 1e-5 * slack).sum())
        assert off <= max(1, gap.numel() // 10_000), f"{name}: {off} of {gap.numel()} elements differ"
        assert float(gap.max()) <= adam_bound, f"{name}: {float(gap.max()):.2e} > {adam_bound:.1e}"


SHARED_MEANS = ["correction/weight_mean", "correction/truncated_frac", "correction/weight_before_bounds_max",
                "correction/weight_before_bounds_min", "drift/kl_k1", "drift/kl_k3", "drift/ratio_mean"]
ROUND_START_ANCHOR = ["train.anchor=round_start", "correction.level=prefix_min", "correction.high=1.02",
                      "train.factor_metrics=true"]  # the trainer's own rescoring, each rank a share, gathered


@pytest.mark.parametrize(
    ("strategy", "loss_agg", "memory", "anchoring"),
    [
        ("ddp", "token-mean", [], []),
        ("fsdp", "seq-mean-token-sum-norm", [], ROUND_START_ANCHOR),
        # micro-batches of ~1–2 rows, so ranks make different numbers of passes (stand-ins), and
        # activation checkpointing inside FSDP2's per-block shards
        ("fsdp", "seq-mean-token-mean", ["train.micro_batch_tokens=80", "train.activation_checkpointing=true"], []),
    ],
)
def test_two_gloo_ranks_train_like_one_process(tmp_path, rollouts, strategy, loss_agg, memory, anchoring):
    # one forward/backward per minibatch, rows in order, unless `memory` says otherwise: 1 vs 2 ranks
    # is the question here (micro-batch invariance has its own tests)
    common = [f"train.rollouts={rollouts}", "train.iterations=3", f"objective.options.loss_agg={loss_agg}",
              "train.micro_batch_tokens=null", *anchoring]
    run_train(load_recipe(QUICKSTART, [f"run_dir={tmp_path / 'one'}", *SMALL, *common]))
    # 3 prompts × 4 responses per round in 2 minibatches of 6: 3 rows per rank, odd token counts
    two = minpro_train(tmp_path / "two", *common, f"distributed.strategy={strategy}", *memory)
    output, _ = two.communicate(timeout=300)
    assert two.returncode == 0, output
    assert_same_training(tmp_path / "one", tmp_path / "two")
    for x, y in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two")):
        for key in [k for k in SHARED_MEANS if k in x]:  # token means and extremes; quantiles are per rank
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), key
    if anchoring:  # the stored rows' μ is round 0's weights; later rounds start elsewhere and the correction bites
        assert any(m["correction/truncated_frac"] > 0 for m in metrics(tmp_path / "one"))
    checkpoint = tmp_path / "two" / "checkpoints" / "round_00003"
    # one safetensors shard file per rank, and no pickled .metadata
    shards = sorted(p.name for p in (checkpoint / "dcp").iterdir())
    assert shards == [f"shard-0000{i}-model-00001-of-00001.safetensors" for i in (1, 2)]


def test_two_fsdp_ranks_train_lora_with_kl_and_entropy_like_one_process(tmp_path, rollouts):
    """Adapters start alike on every rank (from the seed alone), and the adapters-off KL reference
    runs through FSDP2's shards."""
    common = [f"train.rollouts={rollouts}", "train.iterations=2", "train.micro_batch_tokens=null", "optim.lr=1e-3",
              "model.lora.r=4", "train.kl_coef=0.1", "train.entropy_coef=0.01"]  # fmt: skip
    run_train(load_recipe(QUICKSTART, [f"run_dir={tmp_path / 'one'}", *SMALL, *common]))
    two = minpro_train(tmp_path / "two", *common, "distributed.strategy=fsdp")
    output, _ = two.communicate(timeout=300)
    assert two.returncode == 0, output
    assert_same_training(tmp_path / "one", tmp_path / "two")
    kl = [[m["kl_ref"] for m in metrics(tmp_path / run)] for run in ("one", "two")]
    assert kl[1] == pytest.approx(kl[0], rel=1e-4) and min(kl[0]) > 0


def rank_pid(tag: str, rank: int) -> int | None:
    """The worker process torchrun started for `rank` of the run tagged `tag`."""
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"MINPRO_TEST_TAG={tag}".encode() in environ and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    return None


def test_killed_rank_stops_the_job_and_a_rerun_resumes_from_the_last_checkpoint(tmp_path, rollouts):
    common = [f"train.rollouts={rollouts}", "train.iterations=12"]
    run_dir = tmp_path / "cut"
    job = minpro_train(run_dir, *common, tag=str(tmp_path))
    marker = run_dir / "checkpoints" / "round_00003" / ".complete"
    deadline = time.monotonic() + 240
    while not marker.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    pid = rank_pid(str(tmp_path), 1)
    assert pid is not None and job.poll() is None, "the run ended before rank 1 could be killed"
    os.kill(pid, signal.SIGKILL)
    output, _ = job.communicate(timeout=120)
    assert job.returncode == 2
    assert "distributed training stopped" in output and "SIGKILL" in output
    last = output.split("last complete checkpoint: ")[1].split(";")[0]
    assert Path(last).name.startswith("round_") and not (run_dir / "final").exists()
    stopped_at = int(Path(last).name.split("_")[1])
    assert 3 <= stopped_at < 12

    resumed = minpro_train(run_dir, *common)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert f"resuming from {last} (round {stopped_at}," in output
    assert [m["round"] for m in metrics(run_dir)] == list(range(12))  # none lost, none twice
    # against an uninterrupted 2-rank run: the resume itself must change nothing (1 vs 2 ranks is
    # the test above; over these 24 steps float32 rounding drifts to ~3e-4 of the gradient norm)
    straight = minpro_train(tmp_path / "straight", *common)
    output, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, output
    assert_same_training(tmp_path / "straight", run_dir)


def test_online_rounds_are_sampled_by_both_ranks_and_written_once(tmp_path):
    run_dir = tmp_path / "online"
    job = minpro_train(run_dir, "train.iterations=2", "train.staleness=1", "train.group_size=2", "train.eval_every=1",
                       "eval.max_problems=3", "eval.n_samples=2", "eval.k=[1,2]", "distributed.strategy=fsdp")
    output, _ = job.communicate(timeout=300)
    assert job.returncode == 0, output

    rows = read_rollouts(run_dir / "rollouts" / "round_00001.parquet").to_pylist()
    assert len(rows) == 3 * 2 and len({r["prompt_id"] for r in rows}) == 3  # every prompt of the round, once
    assert len({r["seed"] for r in rows}) == 2  # each rank sampled its share with its own seed
    assert {r["policy_version"] for r in rows} == {0}  # staleness 1: round 1 samples round 0's weights
    assert [e["round"] for e in (json.loads(line) for line in (run_dir / "evals.jsonl").read_text().splitlines())] == [
        0, 1, 2
    ]
    assert [m["round"] for m in metrics(run_dir)] == [0, 1]
    assert output.count("final weights:") == 1  # one rank speaks


def test_fsdp_checkpoint_resumes_in_one_process(tmp_path, rollouts):
    """dcp/ reshards on load: 2 FSDP2 ranks train 2 rounds, one plain process finishes the run."""
    common = [f"train.rollouts={rollouts}"]
    run_dir = tmp_path / "switch"
    two = minpro_train(run_dir, *common, "train.iterations=2", "distributed.strategy=fsdp")
    output, _ = two.communicate(timeout=300)
    assert two.returncode == 0, output
    by_two_ranks = (run_dir / "metrics.jsonl").read_text()
    run_train(load_recipe(QUICKSTART, [f"run_dir={run_dir}", *SMALL, *common, "train.iterations=3"]))
    lines = (run_dir / "metrics.jsonl").read_text()
    assert lines.startswith(by_two_ranks) and len(lines.splitlines()) == 3  # rounds 0–1 kept, round 2 added
    run_train(load_recipe(QUICKSTART, [f"run_dir={tmp_path / 'straight'}", *SMALL, *common, "train.iterations=3"]))
    # two ranks then one sum their gradients in another order than one process throughout:
    # on an AVX2 EPYC the grad norm came 1.03e-5 apart (relative), just past the default 1e-5
    assert_same_training(tmp_path / "straight", run_dir, slack=3.0)
