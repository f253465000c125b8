"""Reward verifiers: score a response against a reference answer.

A verifier plugin is a Pydantic model (its options) that is callable:

    verifier(response: str, reference: str) -> VerifyResult

It never raises on bad model output: a garbage answer scores 0 with the reason in
`details["failure"]`. Subclass `VerifierOptions` to get `verifier.batch(responses,
references)`, which scores many responses in parallel worker processes. A verifier that
wants the prompt and the row's other columns (`python`'s reward functions) overrides
`score(response, reference, context)`.

Every call is bounded: a verifier that declares `bounded_in_process` (the built-ins, which
bound their own work) may run here; any other runs in worker processes, each call with a
deadline, so a plugin that hangs costs a timeout, not the run.
"""

from __future__ import annotations

import atexit
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, Field

from minpro_cli.errors import MinproError
from minpro_cli.verifiers.workers import CallFailed, Lost, StartFailed, WorkerPool

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
    bounded_in_process: ClassVar[bool] = False  # True: its own checks bound every call (the built-ins)

    def __call__(self, response: str, reference: str) -> VerifyResult:
        raise NotImplementedError

    def reference_response(self, reference: str) -> str:
        """A response that states `reference` as this verifier expects an answer: it must score 1
        (`minpro doctor` checks the data's references with it)."""
        return reference

    def score(self, response: str, reference: str, context: Mapping[str, Any]) -> VerifyResult:
        """A call with the row's context (`prompt`, `prompt_id`, `completion_ids`, `columns`)."""
        return self(response, reference)

    def batch(self, responses: list[str], references: list[str], workers: int | None = None) -> list[VerifyResult]:
        """Score `responses[i]` against `references[i]`; in parallel processes for large batches."""
        return verify_batch(self, responses, references, workers)


WORKER_START_S = 300.0  # a spawned worker's interpreter and imports, however loaded the machine
_pool: WorkerPool | None = None  # one per process, reused while the verifier's class and worker count stay


def _pool_for(verifier: Verifier, workers: int) -> WorkerPool:
    """Each call carries its verifier, so a new instance of the same class (a stage that builds
    its verifier per batch) reuses the pool; another class restarts it with that class imported."""
    global _pool
    if _pool is None or _pool.size != workers or type(_pool.warm) is not type(verifier):
        _discard_pool()
        _pool = WorkerPool(_call, verifier, workers, WORKER_START_S)
    return _pool


def _discard_pool() -> None:
    global _pool
    if _pool is not None:
        _pool.close()
        _pool = None


atexit.register(_discard_pool)


def _call(verifier: Verifier, response: str, reference: str, context: Mapping[str, Any]) -> VerifyResult:
    score = getattr(verifier, "score", None)
    return score(response, reference, context) if score is not None else verifier(response, reference)


class VerifierCallError(Exception):
    """The verifier raised on item `index` of a batch (the caller names the row)."""

    def __init__(self, index: int, cause: BaseException) -> None:
        text = str(cause) if type(cause).__name__ == "RewardFunctionError" else f"raised {type(cause).__name__}: {cause}"
        super().__init__(text.splitlines()[0][:300] if text else type(cause).__name__)
        self.index = index


def timed_out(result: VerifyResult) -> bool:
    return str(result.details.get("failure", "")).startswith("verifier timed out")


def verify_batch(
    verifier: Verifier,
    responses: list[str],
    references: list[str],
    workers: int | None = None,
    probe: int = 16,
    contexts: list[Mapping[str, Any]] | None = None,
) -> list[VerifyResult]:
    """Results in input order; a call that raises is a `VerifierCallError` naming its index.

    A verifier that is `bounded_in_process` runs its first `probe` calls here, timed; if the
    rest would take under a second at that pace (a plain-number check takes microseconds), they
    run here too. Otherwise, and always for any other verifier, calls go to `workers`
    processes, where each gets 2·timeout_s + 5 s before it is abandoned with reward 0 and its
    worker replaced (a worker that dies abandons its call the same way).
    """
    if len(responses) != len(references):
        raise ValueError(f"{len(responses)} responses for {len(references)} references")
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    items = list(zip(responses, references, contexts or [{}] * len(responses)))
    results: list[VerifyResult] = []
    if getattr(verifier, "bounded_in_process", False):
        started = time.perf_counter()
        results = _in_process(verifier, items[:probe], 0)
        per_call = (time.perf_counter() - started) / max(len(results), 1)
        rest = items[len(results) :]
        if workers <= 1 or len(rest) < PARALLEL_MIN_BATCH or (results and per_call * len(rest) < 1.0):
            return results + _in_process(verifier, rest, len(results))
    return results + _in_workers(verifier, items[len(results) :], len(results), max(workers, 1))


def _in_process(verifier: Verifier, items: list[tuple[str, str, Mapping[str, Any]]], offset: int) -> list[VerifyResult]:
    results = []
    for index, item in enumerate(items, start=offset):
        try:
            results.append(_call(verifier, *item))
        except Exception as exc:  # noqa: BLE001 — any error of a plugin is reported with its row
            raise VerifierCallError(index, exc) from None
    return results


def _in_workers(
    verifier: Verifier, items: list[tuple[str, str, Mapping[str, Any]]], offset: int, workers: int
) -> list[VerifyResult]:
    """The workers start and import the verifier's module before any call is timed: a cold
    spawn under load can take longer than a call's bound. A verifier that cannot reach them
    (one that cannot be pickled) fails as its first call, item `offset`, would have."""
    if not items:
        return []
    bound = 2 * float(getattr(verifier, "timeout_s", 5.0)) + 5.0
    try:
        outcomes = _pool_for(verifier, workers).run([(verifier, *item) for item in items], bound)
    except StartFailed as exc:
        _discard_pool()
        if exc.cause is None:
            raise MinproError(f"the verifier's {workers} worker processes did not start within {WORKER_START_S:.0f} s") from None
        raise VerifierCallError(offset, exc.cause) from None
    except CallFailed as exc:
        raise VerifierCallError(offset + exc.index, exc.cause) from None
    except BaseException:
        _discard_pool()  # e.g. Ctrl-C: calls left running in the workers must not answer the next batch
        raise
    return [
        VerifyResult(0.0, {"extracted": None, "failure": f"verifier {outcome.reason}"}) if isinstance(outcome, Lost) else outcome
        for outcome in outcomes
    ]
