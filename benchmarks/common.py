"""Shared by the benchmarks: the RL-step workload and per-phase peak-memory measurement."""

from __future__ import annotations

import multiprocessing as mp
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from transformers.utils import logging as hf_logging

from minpro_cli.modeling import Policy
from minpro_cli.rollouts import RolloutRow
from minpro_cli.samplers.hf import HFSampler
from minpro_cli.tasks import load_problems, render_prompt

N_PROMPTS, GROUP_SIZE, MAX_NEW_TOKENS = 32, 8, 64
hf_logging.disable_progress_bar()
T = TypeVar("T")


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


def timed(fn: Callable[[], T], repeats: int = 3) -> tuple[float, T]:
    """Median seconds of `repeats` calls after one warm-up call, and what one call returned."""
    tokens = fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), tokens


def prompts(policy: Policy) -> list[list[int]]:
    """N_PROMPTS training problems, each repeated GROUP_SIZE times, as token ids."""
    problems = load_problems("embedded:arith-train")[:N_PROMPTS]
    ids = [policy.tokenizer.encode(render_prompt("{question}\n", p), add_special_tokens=False) for p in problems]
    return [p for p in ids for _ in range(GROUP_SIZE)]


def sampled_rows(policy: Policy) -> list[RolloutRow]:
    """One sampled batch as rollout rows (rewards alternate so every group has signal)."""
    batch = prompts(policy)
    gens = HFSampler(max_new_tokens=MAX_NEW_TOKENS, batch_size=len(batch)).generate(policy, batch, seed=0)
    return [
        RolloutRow(
            prompt_id=str(i // GROUP_SIZE), sample_index=i % GROUP_SIZE, prompt="", response="", prompt_token_ids=p,
            response_token_ids=g.token_ids, behavior_logprobs=g.logprobs, reference_answer="",
            reward=float(i % 3 == 0), verifier="", verifier_details="{}", finish_reason=g.finish_reason,
            policy_version=0, model_fingerprint="", tokenizer_fingerprint="", sampler="hf", temperature=1.0,
            top_p=1.0, top_k=0, seed=0,
        )
        for i, (p, g) in enumerate(zip(batch, gens))
    ]
