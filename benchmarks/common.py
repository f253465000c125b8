"""Shared by the benchmarks: the RL-step workload and per-phase peak-memory measurement."""

from __future__ import annotations

import multiprocessing as mp
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

N_PROMPTS, GROUP_SIZE, MAX_NEW_TOKENS = 32, 8, 64


@dataclass
class Measurement:
    seconds: float
    tokens: int
    peak_mb: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def _child(fn: Callable[[], tuple[float, int]], queue: mp.Queue) -> None:
    torch.set_num_threads(torch.get_num_threads())
    seconds, tokens = fn()
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    queue.put((seconds, tokens, peak))


def measure(fn: Callable[[], tuple[float, int]]) -> Measurement:
    """Run fn (returning seconds, tokens) in a fresh process so its peak memory is its own."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return Measurement(*result)


def timed(fn: Callable[[], int], repeats: int = 3) -> tuple[float, int]:
    """Median seconds of `repeats` calls after one warm-up call, and the tokens of one call."""
    tokens = fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), tokens
