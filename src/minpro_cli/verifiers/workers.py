"""Worker processes that run calls with a deadline each, one pipe per worker.

Why not `multiprocessing.Pool`: its workers send results through one shared pipe behind a
lock, and `Pool.terminate()` kills workers that may hold that lock; its task thread then
waits on it forever. A reward function that raised hung `minpro eval` that way about one
time in twenty (CPython 3.11). Here a worker shares nothing with the others, so killing one
(a call past its deadline, calls abandoned after another call raised) blocks nothing.

Each worker receives `(function, warm)` once, when it starts (unpickling `warm` imports its
module there, before any call is timed), then runs `function(*item)` per item.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import ForkingPickler
from typing import Any

_CONTEXT = mp.get_context("spawn")  # a forked copy of a process that has run torch's thread pool can deadlock


@dataclass(frozen=True)
class Lost:
    """An item whose call gave no answer: past its deadline, or its worker died."""

    reason: str


class CallFailed(Exception):
    """`function` raised on item `index` (the lowest such index of the items run)."""

    def __init__(self, index: int, cause: BaseException) -> None:
        super().__init__(index, cause)
        self.index, self.cause = index, cause


class StartFailed(Exception):
    """A worker could not take `warm` (it raised `cause`) or did not start within the bound."""

    def __init__(self, cause: BaseException | None) -> None:
        super().__init__(cause)
        self.cause = cause


def _reply(conn: Connection, ok: bool, value: Any) -> None:
    try:
        payload = ForkingPickler.dumps((ok, value))
    except Exception as exc:  # noqa: BLE001 — a value or exception that cannot be pickled
        payload = ForkingPickler.dumps((False, RuntimeError(f"{type(value).__name__} could not be sent back: {exc}")))
    conn.send_bytes(payload)


def _worker_main(conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it kills us
    _serve(conn)


def _serve(conn: Connection) -> None:
    """A worker's loop; it ends, quietly, when the parent closes its end or is gone."""
    try:
        payload = conn.recv_bytes()
        try:
            function, _ = ForkingPickler.loads(payload)
        except BaseException as exc:  # noqa: BLE001 — e.g. the warm-up object's module fails to import here
            _reply(conn, False, exc)
            return
        _reply(conn, True, None)
        while True:
            item = conn.recv()
            try:
                ok, value = True, function(*item)
            except BaseException as exc:  # noqa: BLE001 — any error of the call is the caller's to report
                ok, value = False, exc
            _reply(conn, ok, value)
    except (EOFError, OSError):
        return  # the parent is gone (it exited without killing us, e.g. through os._exit)


class _Worker:
    def __init__(self, function: Callable[..., Any], warm: Any, start_s: float) -> None:
        self.conn, child = _CONTEXT.Pipe()
        self.process = _CONTEXT.Process(target=_worker_main, args=(child,), daemon=True)
        self.process.start()
        child.close()
        self.ready = False  # it answered that it imported what `warm` needs
        self.index: int | None = None  # the item it is running
        self.deadline = time.monotonic() + start_s  # to be ready by, then to answer `index` by
        try:
            self.conn.send((function, warm))
        except Exception as exc:  # noqa: BLE001 — e.g. an object that cannot be pickled
            self.kill()
            raise StartFailed(exc) from None

    def kill(self) -> None:
        self.process.kill()
        self.process.join(timeout=10)
        self.conn.close()

    def receive(self) -> tuple[bool, Any] | None:
        """The worker's answer; None when it died (its pipe closed)."""
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            return None


class WorkerPool:
    """`workers` processes that run `function`, started with `warm` (an object whose module
    every call will need); `run` is the one call."""

    def __init__(self, function: Callable[..., Any], warm: Any, workers: int, start_s: float) -> None:
        self.function, self.warm, self.size, self.start_s = function, warm, workers, start_s
        self.workers: list[_Worker] = []

    def close(self) -> None:
        for worker in self.workers:
            worker.kill()
        self.workers = []

    def pids(self) -> list[int | None]:
        return [worker.process.pid for worker in self.workers]

    def _start(self) -> None:
        """Top the pool up, then wait until every worker is ready."""
        while len(self.workers) < self.size:
            self.workers.append(_Worker(self.function, self.warm, self.start_s))
        for worker in (w for w in self.workers if not w.ready):
            ready = worker.conn.poll(max(worker.deadline - time.monotonic(), 0.0))
            self._started(worker, worker.receive() if ready else None)

    def _started(self, worker: _Worker, answer: tuple[bool, Any] | None) -> None:
        if answer is None or not answer[0]:
            self.close()
            raise StartFailed(answer[1] if answer else None)
        worker.ready = True

    def _replace(self, worker: _Worker) -> None:
        """Kill `worker` (its call is abandoned) and start another in its place."""
        worker.kill()
        self.workers[self.workers.index(worker)] = _Worker(self.function, self.warm, self.start_s)

    def run(self, items: Sequence[tuple[Any, ...]], bound: float) -> list[Any]:
        """`function(*item)` for each item, in item order, each call given `bound`
        seconds; a call past it is `Lost` and its worker replaced. When a call raises, no
        further items start, the calls running at lower indices finish, the others are
        killed, and `CallFailed` names the lowest index that raised."""
        self._start()
        results: list[Any] = [None] * len(items)
        failures: dict[int, BaseException] = {}
        queued = 0
        while True:
            for worker in self.workers:
                if worker.ready and worker.index is None and queued < len(items) and not failures:
                    try:
                        worker.conn.send(items[queued])
                    except OSError:  # it died while idle: another takes its place, the item waits
                        self._replace(worker)
                        continue
                    except Exception as exc:  # noqa: BLE001 — the item cannot be pickled: its call fails
                        failures[queued] = exc
                        break
                    worker.index, worker.deadline = queued, time.monotonic() + bound
                    queued += 1
            for worker in self.workers:  # calls that can no longer change the outcome
                if worker.index is not None and worker.index > min(failures, default=len(items)):
                    self._replace(worker)
            busy = [w for w in self.workers if w.index is not None]
            if not busy and (failures or queued == len(items)):
                break
            waiting = busy + [w for w in self.workers if not w.ready]
            answered = set(wait([w.conn for w in waiting], max(min(w.deadline for w in waiting) - time.monotonic(), 0.0)))
            for worker in waiting:
                if not worker.ready:
                    if worker.conn in answered or time.monotonic() >= worker.deadline:
                        self._started(worker, worker.receive() if worker.conn in answered else None)
                    continue
                index = worker.index
                assert index is not None
                if worker.conn in answered:
                    answer = worker.receive()
                    worker.index = None
                    if answer is None:
                        worker.process.join(timeout=10)
                        results[index] = Lost(f"worker process died (exit code {worker.process.exitcode})")
                        self._replace(worker)
                    elif answer[0]:
                        results[index] = answer[1]
                    else:
                        failures[index] = answer[1]
                elif time.monotonic() >= worker.deadline:
                    results[index] = Lost(f"timed out after {bound:.0f} s")
                    self._replace(worker)
        if failures:
            index = min(failures)
            raise CallFailed(index, failures[index])
        return results
