"""What every `minpro` command shares: the error handling that turns a MinproError into one
line and Ctrl-C into a resume hint, and quiet third-party libraries."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import typer

from minpro_cli.console import console
from minpro_cli.errors import DIE_WITH_PARENT, Interrupted, MinproError, Terminated

F = TypeVar("F", bound=Callable[..., Any])


def _quiet_libraries() -> None:
    """Through the environment, read when transformers is first imported: a command that never
    loads a model (a refused recipe, `minpro config`) does not pay for importing it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _terminate(signum: int, frame: object) -> None:
    raise Terminated(signum)


def _stop_like_ctrl_c() -> None:
    """SIGTERM and SIGHUP stop a command as Ctrl-C does: writes finish or are undone, the lock
    is released, and the rerun resumes (only the main thread can take a signal handler)."""
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(signum) is not signal.SIG_IGN:  # `nohup minpro …` keeps ignoring SIGHUP
                signal.signal(signum, _terminate)
        _die_with_parent()


def _die_with_parent() -> None:
    """A sweep's run: SIGTERM when the sweep dies however it dies (Linux's PR_SET_PDEATHSIG),
    so that no run trains on, holding its lock, after its sweep is gone."""
    parent = os.environ.pop(DIE_WITH_PARENT, None)
    if parent and sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != int(parent):  # it died before prctl took effect
            raise Terminated(signal.SIGTERM)


def say(line: str) -> None:
    """One line straight to stderr's file descriptor. A signal that lands inside an earlier print
    can leave rich's or Python's stderr buffer mid-write (seen once in CI: a run stopped by a
    signal, with the right exit code and no line); the line that says how to resume must get out."""
    try:
        fd = sys.stderr.fileno()
    except (OSError, ValueError, AttributeError):  # a captured stream (a test runner's): no descriptor
        console.print(line, soft_wrap=True, markup=False)
        return
    with contextlib.suppress(OSError, RuntimeError, ValueError):
        sys.stderr.flush()
    os.write(fd, (line + "\n").encode())


def user_errors(fn: F) -> F:
    """Turn MinproError into one red line and exit code 2; Ctrl-C, SIGTERM and SIGHUP into a
    resume hint and exit code 128 + signal number (130, 143, 129)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _quiet_libraries()
        try:
            _stop_like_ctrl_c()
            return fn(*args, **kwargs)
        except MinproError as exc:
            console.print(f"error: {exc}", soft_wrap=True, markup=False, style="bold red")
            raise typer.Exit(2) from None
        except KeyboardInterrupt as exc:
            signum = getattr(exc, "signum", None) or signal.SIGINT
            saved = str(exc) if isinstance(exc, Interrupted) else "finished outputs and checkpoints are intact"
            by = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
            say(f"interrupted{by}: {saved}; rerun the same command to resume")
            raise typer.Exit(128 + signum) from None

    return wrapper  # type: ignore[return-value]
