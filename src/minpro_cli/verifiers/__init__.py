"""Reward verifiers: score a response against a reference answer.

A verifier plugin is a Pydantic model (its options) that is callable:

    verifier(response: str, reference: str) -> VerifyResult

It never raises on bad model output: a garbage answer scores 0 with the reason in
`details["failure"]`. Subclass `VerifierOptions` to get `verifier.batch(responses,
references)`, which scores many responses in parallel worker processes.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from multiprocessing.pool import Pool
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

PARALLEL_MIN_BATCH = 64  # below this, starting work in other processes costs more than it saves


@dataclass
class VerifyResult:
    reward: float  # in [0, 1]
    details: dict[str, Any] = field(default_factory=dict)


class Verifier(Protocol):
    def __call__(self, response: str, reference: str) -> VerifyResult: ...


class VerifierOptions(BaseModel):
    """Base of the built-in verifiers: options, a call, and a parallel batch call.

    `timeout_s` bounds one call. In a worker process a call that overruns it by far is cut
    off from outside and scores 0, so a hostile response cannot stall a batch.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout_s: float = Field(5.0, gt=0.0, description="bound on one call")

    def __call__(self, response: str, reference: str) -> VerifyResult:
        raise NotImplementedError

    def batch(self, responses: list[str], references: list[str], workers: int | None = None) -> list[VerifyResult]:
        """Score `responses[i]` against `references[i]`; in parallel processes for large batches."""
        return verify_batch(self, responses, references, workers)


_POOL: dict[str, Any] = {}


def _worker_pool(workers: int) -> Pool:
    """One pool per process, reused across batches. `spawn`: a forked copy of a process that
    has run torch's thread pool can deadlock."""
    pool = _POOL.get("pool")
    if pool is None or _POOL.get("workers") != workers:
        if pool is not None:
            pool.terminate()
        pool = mp.get_context("spawn").Pool(workers)
        _POOL.update(pool=pool, workers=workers)
    return pool


def _discard_pool() -> None:
    pool = _POOL.pop("pool", None)
    if pool is not None:
        pool.terminate()
        pool.join()


atexit.register(_discard_pool)


def _call(verifier: Verifier, response: str, reference: str) -> VerifyResult:
    return verifier(response, reference)


def verify_batch(
    verifier: Verifier, responses: list[str], references: list[str], workers: int | None = None, probe: int = 16
) -> list[VerifyResult]:
    """Results in input order.

    The first `probe` calls run here, timed. If the rest would take under a second at that
    pace (a plain-number check takes microseconds), they run here too; otherwise they go to
    `workers` processes, where each call gets 2·timeout_s + 5 s before it is abandoned with
    reward 0 and the pool is replaced.
    """
    if len(responses) != len(references):
        raise ValueError(f"{len(responses)} responses for {len(references)} references")
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    pairs = list(zip(responses, references))
    started = time.perf_counter()
    results = [verifier(r, a) for r, a in pairs[:probe]]
    rest = pairs[len(results) :]
    per_call = (time.perf_counter() - started) / max(len(results), 1)
    if workers <= 1 or len(rest) < PARALLEL_MIN_BATCH or (results and per_call * len(rest) < 1.0):
        return results + [verifier(r, a) for r, a in rest]
    pool = _worker_pool(workers)
    pending = [pool.apply_async(_call, (verifier, r, a)) for r, a in rest]
    bound = 2 * float(getattr(verifier, "timeout_s", 5.0)) + 5.0
    stalled = False
    for handle in pending:  # a hung worker holds one call; the others keep taking the rest
        try:
            results.append(handle.get(timeout=bound))
        except mp.TimeoutError:
            stalled = True
            results.append(VerifyResult(0.0, {"extracted": None, "failure": f"verifier timed out after {bound:.0f} s"}))
    if stalled:
        _discard_pool()  # its hung worker must not serve the next batch
    return results
