"""Training throughput of `minpro train` in 1 process against 2 gloo ranks (DDP, FSDP2), same
stored rollouts, one run.

    .venv/bin/python benchmarks/distributed.py [--rounds 10]

Each configuration is a real `minpro train` subprocess on the embedded model; tokens/s is
trained response tokens over the rounds' wall time (rounds after the first, which warms up),
peak MB the largest resident set of any one process (a rank). On a CPU with few cores this
measures the cost of the distributed machinery, not a speed-up: the ranks share the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "quickstart.yaml"
COMMON = ["rollout.num_prompts=32", "rollout.group_size=8", "train.prompts_per_iteration=32", "train.minibatches=4",
          "train.checkpoint_every=1000"]


# a fresh parent per command, so its RUSAGE_CHILDREN peak covers that command's processes only
PEAK = "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); " \
       "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"


def minpro(*args: str, threads: int) -> float:
    """Run `minpro ARGS`; the largest resident set (MB) of any process it started."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", PEAK, sys.executable, "-m", "minpro_cli", *args]
    done = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return int(done.stdout.split()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        minpro("rollout", str(RECIPE), f"run_dir={work / 'r'}", *COMMON, threads=cores)
        rollouts = f"train.rollouts={work / 'r' / 'rollouts.parquet'}"
        print(f"\n{args.rounds} rounds × 4 steps on 256 stored responses, embedded model, {cores} cores")
        print(f"{'setup':22} {'tokens/s':>9} {'peak MB':>8}")
        for label, extra, nproc in [("1 process", [], 1), ("2 ranks, DDP", ["distributed.strategy=ddp"], 2),
                                    ("2 ranks, FSDP2", ["distributed.strategy=fsdp"], 2)]:
            run_dir = work / label.replace(" ", "_").replace(",", "")
            peak = minpro("train", str(RECIPE), f"run_dir={run_dir}", *COMMON, rollouts,
                          f"train.iterations={args.rounds}", *extra, f"--nproc={nproc}", threads=max(1, cores // nproc))
            rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
            tokens = sum(r["responses_trained"] * r["response_length_mean"] for r in rounds)
            print(f"{label:22} {tokens / sum(r['time_s'] for r in rounds):9.0f} {peak:8.0f}")


if __name__ == "__main__":
    main()
