"""What every `minpro` command shares: the error handling that turns a MinproError into one
line and Ctrl-C into a resume hint, and quiet third-party libraries."""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import typer

from minpro_cli.console import console
from minpro_cli.errors import Interrupted, MinproError

F = TypeVar("F", bound=Callable[..., Any])


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def user_errors(fn: F) -> F:
    """Turn MinproError into one red line and exit code 2; Ctrl-C into a resume hint."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except MinproError as exc:
            console.print(f"error: {exc}", soft_wrap=True, markup=False, style="bold red")
            raise typer.Exit(2) from None
        except KeyboardInterrupt as exc:
            saved = str(exc) if isinstance(exc, Interrupted) else "finished outputs and checkpoints are intact"
            console.print(f"interrupted: {saved}; rerun the same command to resume", soft_wrap=True, markup=False)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]
