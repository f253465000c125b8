"""Host memory a run holds at train.staleness 2 with a bf16 sampler, before and after the copies
made only to sample were kept in the sampler's precision, inline and with a dedicated sampler.

"before" is `minpro train` from a git revision (a worktree, its `src` first on PYTHONPATH),
"after" from this checkout; same recipe (recipes/smollm2-rl.yaml, 3 rounds of 4 prompts x 4,
32 new tokens, `sampler.options.dtype: bfloat16`, staleness 2, checkpoints off until the end).
Reported: the peak over the run of the summed resident memory (VmRSS) of the trainer and its
children (the dedicated sampler), sampled every 0.1 s, and the peak of minpro's shared-memory
segments in /dev/shm. Variants rotate; min/median/max over runs. RSS is per process, so a busy
machine slows the runs but does not change what they hold.

    .venv/bin/python benchmarks/held_memory.py --before <rev> [--runs 2] [--model runs/smollm2/model]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from proctree import status_bytes, tree

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-rl.yaml"
MODES = {"inline": [], "dedicated": ["sampler.options.placement=dedicated", "sampler.options.threads=1"]}


def segments() -> int:
    return sum(p.stat().st_size for p in Path("/dev/shm").glob("minpro-weights-*") if not p.name.endswith(".json"))


def peak(source: Path, model: str, mode: str) -> tuple[int, int]:
    """Peak summed RSS of the run's process tree, and peak shared-memory segment bytes."""
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = Path(scratch) / "run"
        env = dict(os.environ, PYTHONPATH=str(source / "src"))
        command = [sys.executable, "-m", "minpro_cli", "train", str(RECIPE), f"run_dir={run_dir}", f"model.path={model}",
                   "train.iterations=3", "train.prompts_per_iteration=4", "train.group_size=4", "train.staleness=2",
                   "train.eval_every=0", "train.checkpoint_every=3", "sampler.options.max_new_tokens=32",
                   "sampler.options.dtype=bfloat16", *MODES[mode]]  # fmt: skip
        log = Path(scratch) / "train.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
            held, shm = 0, 0
            while proc.poll() is None:
                held = max(held, sum(status_bytes(p, "VmRSS") for p in tree(proc.pid)))
                shm = max(shm, segments())
                time.sleep(0.1)
        if proc.returncode:
            raise SystemExit(f"{mode} from {source}: exit {proc.returncode}\n{log.read_text()[-2000:]}")
        return held, shm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git revision of the 'before' code")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--model", default=str(ROOT / "runs" / "smollm2" / "model"))
    args = parser.parse_args()
    worktree = Path(tempfile.mkdtemp(prefix="minpro-before-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), args.before],
                   check=True, capture_output=True)  # fmt: skip
    try:
        variants = [(code, mode) for code in ("before", "after") for mode in MODES]
        results: dict[tuple[str, str], list[tuple[int, int]]] = {v: [] for v in variants}
        for r in range(args.runs):
            for code, mode in variants[r % len(variants) :] + variants[: r % len(variants)]:
                results[code, mode].append(peak(worktree if code == "before" else ROOT, args.model, mode))
                print(f"run {r}: {code:6s} {mode:9s} {results[code, mode][-1][0] / 2**30:.2f} GiB", flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], check=False)
    print(f"\nbefore = {args.before}; peak resident memory of the run's processes, GiB (min/median/max of {args.runs}); "
          "peak /dev/shm segments, GiB")  # fmt: skip
    print("| code | placement | resident (GiB) | shared-memory segments (GiB) |\n|---|---|---|---|")
    for (code, mode), values in results.items():
        held = [v[0] / 2**30 for v in values]
        print(f"| {code} | {mode} | {min(held):.2f} / {statistics.median(held):.2f} / {max(held):.2f} | "
              f"{max(v[1] for v in values) / 2**30:.2f} |")


if __name__ == "__main__":
    main()
