"""Terminal output: one rich console, nestable progress bars and warnings."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

# in a log file rich would wrap tables at 80 columns; $COLUMNS still wins
console = Console(stderr=True, width=None if sys.stderr.isatty() or os.environ.get("COLUMNS") else 160)
_active: list[Progress] = []  # rich allows one live display: nested bars join the outer one


@dataclass
class Bar:
    progress: Progress
    task: TaskID

    def advance(self, n: int = 1, info: str | None = None) -> None:
        self.progress.update(self.task, advance=n, **({"info": info} if info is not None else {}))

    def set(self, completed: int, info: str) -> None:
        self.progress.update(self.task, completed=completed, info=info)


@dataclass
class LineBar:
    """Progress as one printed line per update, when the output is a file or a pipe (a live bar
    would only be written when it ends)."""

    description: str
    total: int
    completed: int = 0
    last: str = ""

    def advance(self, n: int = 1, info: str | None = None) -> None:
        self.set(self.completed + n, info or "")

    def set(self, completed: int, info: str) -> None:
        """Print the state if it changed (a caller polling every second prints nothing new)."""
        self.completed = completed
        line = f"{self.description} {completed}/{self.total} {info}".rstrip()
        if completed and line != self.last:  # nothing to say before the first unit is done
            console.print(line, markup=False, soft_wrap=True)
            self.last = line


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[Bar | LineBar]:
    if not console.is_terminal:
        yield LineBar(description, total)
        return
    if _active:
        progress = _active[-1]
        task = progress.add_task(description, total=total, info="")
        try:
            yield Bar(progress, task)
        finally:
            progress.remove_task(task)
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=console.quiet,  # ranks other than 0 of a distributed run
    )
    with progress:
        _active.append(progress)
        try:
            yield Bar(progress, progress.add_task(description, total=total, info=""))
        finally:
            _active.pop()


def titled_table(title: str) -> Table:
    """A table whose title stays on one line: rich wraps a title to the table's own width, which
    for a two-column table of numbers breaks a path in a log into pieces."""
    return Table(title=title, min_width=min(len(title) + 4, console.width))


def print_metrics(title: str, metrics: dict[str, str]) -> None:
    """A two-column metric / value table, values already formatted."""
    table = titled_table(title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, value)
    console.print(table)


def warn(message: str) -> None:
    """One line however long (a log file or a grep gets the whole message)."""
    console.print(f"[yellow]warning:[/yellow] {message}", soft_wrap=True)
