"""Run and sweep directories: the files that say what they are, and the names of runs.

Directories minpro owns: a marker that says so, a lock against a second process, and the
clean-up of what an interrupted write left behind. A run is done when `final/` is complete (or a
sweep restored it from its record), diverged when it holds `diverged.json`; a sweep's runs are
named after their grid values.

A run (or sweep) directory holds `.minpro-run`. minpro writes only into a directory that is
new, empty or marked, so it never overwrites or deletes files it did not write; a directory
of an earlier minpro is adopted by creating the marker by hand. The lock is an advisory
`flock` on `.minpro-lock`, released by the kernel when the holder exits however it exits,
so a killed run never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from minpro_cli.errors import RunDirError
from minpro_cli.fileio import directory_done_marker, remove

MARKER = ".minpro-run"
LOCK = ".minpro-lock"
DIVERGED_FILE = "diverged.json"  # written when a non-finite loss or gradient stops the run
RECORD_FILES = ("recipe.yaml", "metrics.jsonl", "evals.jsonl", DIVERGED_FILE)  # what a report reads of a run
RESTORED_FILE = "restored.json"  # a sweep run finished elsewhere, its record copied in (no weights)
ROLLOUTS_DIR = "rollouts"  # a training run's round files, round_00000.parquet, …
SAMPLER_DIR = "sampler"  # a dedicated sampler's requests and acknowledgements
SAMPLER_LOG = "sampler.log"  # what a dedicated sampler printed
SWEEP_MANIFEST = "sweep.json"  # a sweep directory's grid, seeds and runs (what `minpro report` reads)
# what atomic writes leave when killed: temp files and directories next to their final path
LEFTOVERS = (".*.tmp", ".final.*", "rollouts/.*.tmp", "sampler/.*.tmp", "checkpoints/.round_*.partial")


def claim(directory: Path, what: str = "run") -> bool:
    """Create `directory` as a minpro directory, or accept it when it already is one; refuse a
    non-empty directory without the marker (someone else's files). True if it was new or empty."""
    directory = Path(directory)
    try:
        if directory.exists() and not directory.is_dir():
            raise RunDirError(f"{directory} is a file, not a directory: choose another run_dir")
        marker = directory / MARKER
        fresh = not directory.is_dir() or not any(directory.iterdir())
    except OSError as exc:  # a name too long, a parent that is a file, no permission
        raise RunDirError(f"cannot create {what} directory {directory}: {exc.strerror}; choose another run_dir") from None
    if not fresh and not marker.exists():
        raise RunDirError(
            f"{directory} is not empty and is not a minpro {what} directory (no {MARKER}): minpro would overwrite "
            f"and delete files in it; choose a new or empty run_dir, or, if an earlier minpro wrote it, "
            f"create {marker} to adopt it"
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not marker.exists():
            marker.write_text(json.dumps({"minpro": what}) + "\n")
    except OSError as exc:  # read-only, under a file, a name too long, …
        raise RunDirError(f"cannot create {what} directory {directory}: {exc.strerror}; choose another run_dir") from None
    return fresh


@contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold the directory's lock for the block; a second holder is refused with the first's pid."""
    path = Path(directory) / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunDirError(
                f"{directory} is in use by another minpro process (pid {holder}); wait for it to finish or stop "
                "it, or use another run_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def remove_leftovers(directory: Path) -> list[Path]:
    """Delete the temp files and directories that killed writes left (only under the lock:
    no other process is writing them); return what was removed."""
    removed = []
    for pattern in LEFTOVERS:
        for path in Path(directory).glob(pattern):
            remove(path)
            removed.append(path)
    return removed


@contextmanager
def owned(directory: Path, what: str = "run", lock: bool = True) -> Iterator[None]:
    """Claim the directory, hold its lock for the block, and first clear what killed writes
    left (without `lock`, as `minpro eval` beside a training run: claim only). A directory this
    call created is removed again if the block fails before writing anything into it (a
    refused input leaves nothing behind)."""
    fresh = claim(directory, what)
    try:
        if not lock:
            yield
            return
        with locked(directory):
            remove_leftovers(directory)
            yield
    except BaseException:
        if fresh and {p.name for p in Path(directory).iterdir()} <= {MARKER, LOCK}:
            for name in (MARKER, LOCK):
                (Path(directory) / name).unlink(missing_ok=True)
            Path(directory).rmdir()
        raise


def writes_into(run_dir: Path, path: Path) -> bool:
    return Path(path).resolve().is_relative_to(Path(run_dir).resolve())


def check_replaceable(path: Path, what: str = "output") -> None:
    """An output path outside a run directory may replace only a file minpro wrote (a rollout
    file, or JSON/YAML that records a minpro recipe): never a task file or anyone else's data."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir():
        raise RunDirError(f"{what} {path} is a directory: give a file path")
    if not written_by_minpro(path):
        raise RunDirError(
            f"{what} {path} exists and minpro did not write it: minpro will not replace it; "
            "move it away or choose another path"
        )


def written_by_minpro(path: Path) -> bool:
    """A parquet file with minpro's metadata, or a JSON/YAML mapping that records a recipe
    (`config`, or a recipe's own keys)."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return any(key.startswith(b"minpro.") for key in (pq.read_schema(path).metadata or {}))
        if path.suffix in (".json", ".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML
            return isinstance(data, dict) and ("config" in data or {"run_dir", "model", "objective"} <= data.keys())
    except Exception:  # noqa: BLE001 — unreadable or not what it claims: not ours
        return False
    return False


RunStatus = Literal["done", "diverged", "pending"]


def run_status(directory: Path) -> RunStatus:
    if directory_done_marker(directory / "final").exists():
        return "done"
    if (directory / DIVERGED_FILE).exists():
        return "diverged"
    return "done" if (directory / RESTORED_FILE).exists() else "pending"


def value_label(value: Any) -> str:
    """A grid value as a person writes it: `grpo`, `0.0001`, or a whole objective with its options
    (grid key `objective`, values {name, options}): `minpro:clip_mode=ppo`."""
    if isinstance(value, dict) and "name" in value:
        options = value.get("options") or {}
        return str(value["name"]) + (":" + ",".join(f"{k}={value_label(v)}" for k, v in options.items()) if options else "")
    if isinstance(value, dict):
        return ",".join(f"{k}={value_label(v)}" for k, v in value.items())
    return str(value)


def run_name(overrides: dict[str, Any]) -> str:
    """A directory name that says what the run is: objective.name-grpo__train.staleness-4__seed-0
    (objective-minpro_clip_mode-ppo__… for a whole objective)."""
    parts = [f"{key}-{value_label(value).replace(':', '_').replace('=', '-')}" for key, value in overrides.items()]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", "__".join(parts))
