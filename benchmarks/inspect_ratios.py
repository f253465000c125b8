"""Bounded memory of `inspect-ratios`: streaming vs reading the whole rollout set into memory.

Samples 20 480 rollouts of the embedded model (8 parquet files of 320 problems x 8),
perturbs a copy of the model so the ratios are not all 1, then inspects the first 2 560,
10 240 and 20 480 rows two ways, each in a fresh process (peak RSS is the process's own):
  * streaming: `minpro inspect-ratios` as shipped (batches of 64 rows, fixed-size histograms);
  * in memory: the obvious version, which reads every row and keeps every token's four values
    for exact quantiles at the end.

    .venv/bin/python benchmarks/inspect_ratios.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import measure

from minpro_cli.console import console
from minpro_cli.inspect_ratios import InspectOptions, batch_log_ratios, inspect_ratios
from minpro_cli.modeling import Policy, load_policy
from minpro_cli.ratiostats import QUANTILES, log_quantities
from minpro_cli.rollouts import read_rollout_rows, write_rollouts
from minpro_cli.samplers.hf import HFSampler
from minpro_cli.sampling import SamplingJob, sample_rows
from minpro_cli.tasks import load_problems
from minpro_cli.verifiers.math import MathVerifier

N_FILES, PROBLEMS_PER_FILE, GROUP = 8, 320, 8  # 8 x 320 x 8 = 20 480 rows
SIZES = (1, 4, 8)  # files inspected: 2 560, 10 240, 20 480 rows


def drifted_policy() -> Policy:
    policy = load_policy("embedded")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=generator))
    return policy


def make_rollouts(directory: Path) -> tuple[float, int]:
    policy = load_policy("embedded")
    problems = load_problems("embedded:arith-train")
    job = SamplingJob(policy, HFSampler(max_new_tokens=48, batch_size=256), "hf", MathVerifier(), "math",
                      "{question}\n")
    total, started = 0, time.perf_counter()
    for f in range(N_FILES):
        chunk = [problems[(f * PROBLEMS_PER_FILE + i) % len(problems)] for i in range(PROBLEMS_PER_FILE)]
        rows, _ = sample_rows(job, chunk, GROUP, seed=f, label=f"file {f + 1}/{N_FILES}")
        write_rollouts(directory / f"part_{f:02d}.parquet", rows, {})
        total += len(rows)
    return time.perf_counter() - started, total


def streaming(spec: str) -> tuple[float, int]:
    policy = drifted_policy()
    started = time.perf_counter()
    report = inspect_ratios(spec, policy, InspectOptions(batch_size=64))
    return time.perf_counter() - started, report["n_sequences"]


def in_memory(spec: str) -> tuple[float, int]:
    policy = drifted_policy()
    started = time.perf_counter()
    rows = read_rollout_rows(spec)
    values: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(rows), 64):
        log_rho, mask, _ = batch_log_ratios(rows[start : start + 64], policy)
        for key, logs in log_quantities(log_rho, mask).items():
            values.setdefault(key, []).append(logs[mask].exp())
    for parts in values.values():
        flat = torch.cat(parts)
        torch.quantile(flat, torch.tensor(QUANTILES, dtype=flat.dtype))
        flat.mean(), flat.std(), flat.min(), flat.max()
    return time.perf_counter() - started, len(rows)


def main() -> None:
    console.quiet = True  # the stage's own tables would drown the figures
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        print(f"sampling {N_FILES * PROBLEMS_PER_FILE * GROUP} rollouts of the embedded model ...", flush=True)
        # every torch computation runs in a forked child: a parent that used its thread pool
        # before forking can deadlock the child
        made = measure(lambda: make_rollouts(directory))
        print(f"{made.tokens} rollouts in {made.seconds:.0f} s; {torch.get_num_threads()} threads")
        print(f"{'method':12s} {'rows':>7s} {'seconds':>8s} {'rows/s':>8s} {'peak RSS MB':>12s}")
        for n_files in SIZES:
            spec = str(directory / f"part_0[0-{n_files - 1}].parquet")
            for name, fn in (("streaming", streaming), ("in memory", in_memory)):
                m = measure(lambda fn=fn, spec=spec: fn(spec))
                print(f"{name:12s} {m.tokens:7d} {m.seconds:8.1f} {m.tokens / m.seconds:8.0f} {m.peak_mb:12.0f}",
                      flush=True)


if __name__ == "__main__":
    main()
