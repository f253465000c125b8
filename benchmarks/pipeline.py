"""Does sampling ahead pay? Sequential, pipelined and dedicated rounds of `minpro train`, side by side.

With train.staleness = 1, round r+1 samples with weights that exist before round r trains, so
the pipelined loop samples it in a background thread during round r's update, and a dedicated
sampler (sampler.options.placement=dedicated, one thread) in a process of its own (same
results, tested bit for bit). Each run is `minpro train` in a fresh process (quickstart recipe,
32 prompts x 8, <= 64 new tokens, 5 rounds, no evaluation); the figure is the sum of the
rounds' `time_s` after the first (which has nothing to overlap with). Modes rotate;
min/median/max over runs.

    .venv/bin/python benchmarks/pipeline.py [--runs 3] [--models embedded,qwen2-4.5m]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qwen2_models import build

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 5


def model_path(name: str) -> str:
    return "embedded" if name == "embedded" else str(build(name, ROOT / "runs" / "bench-models" / name))


MODES = {
    "sequential": [],
    "pipelined": ["train.pipeline=true"],
    "dedicated": ["sampler.options.placement=dedicated", "sampler.options.threads=1"],
}


def _train(path: str, mode: str, run_dir: str) -> None:
    from minpro_cli.config import load_recipe
    from minpro_cli.console import console
    from minpro_cli.train import run_train

    console.quiet = True
    run_train(load_recipe(ROOT / "recipes" / "quickstart.yaml", [
        f"run_dir={run_dir}", f"model.path={path}", "train.staleness=1", *MODES[mode],
        f"train.iterations={ROUNDS}", "train.eval_every=0", f"train.checkpoint_every={ROUNDS}",
    ]))


def seconds(path: str, mode: str) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        proc = mp.get_context("spawn").Process(target=_train, args=(path, mode, run_dir))
        proc.start()
        proc.join()
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
        return sum(json.loads(line)["time_s"] for line in lines[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--models", default="embedded,qwen2-4.5m")
    args = parser.parse_args()
    print(f"{torch.get_num_threads()} threads; seconds for rounds 2-{ROUNDS} (min/median/max of {args.runs} runs)")
    modes = list(MODES)
    for name in args.models.split(","):
        path, times = model_path(name), {m: [] for m in modes}
        for r in range(args.runs):
            for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:
                times[mode].append(seconds(path, mode))
        medians = {m: statistics.median(t) for m, t in times.items()}
        cells = [f"{m} {min(t):.1f}/{medians[m]:.1f}/{max(t):.1f} s ({medians[m] / medians['sequential']:.2f})"
                 for m, t in times.items()]  # fmt: skip
        print(f"{name:11s} " + "   ".join(cells))


if __name__ == "__main__":
    main()
