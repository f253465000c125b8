"""`minpro sweep`: a grid of ordinary `minpro train` runs, resumable and run-by-run rerun-safe.

SWEEP_DIR/
  sweep.json            the grid, the seeds and every run's overrides (what `minpro report` reads)
  runs/<name>/          a normal run directory: recipe.yaml, train.log, metrics.jsonl, evals.jsonl,
                        checkpoints/, final/ (done) or diverged.json (stopped by a non-finite loss)

A run with final/ or diverged.json is finished and never rerun; any other run is (re)started
with `minpro train`, which resumes from its last checkpoint.

With `--records DIR` each finished run also leaves its record, DIR/<name>/ (recipe, metrics,
evaluations, divergence: what `minpro report` reads, kilobytes, to commit), and a run whose record
is there is restored from it instead of trained: a study can be finished on another machine.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

from minpro_cli.config import Recipe, dump_recipe, load_recipe, parse_override, recipe_from_data, set_dotted
from minpro_cli.console import console, progress_bar
from minpro_cli.errors import DIE_WITH_PARENT, ConfigError, MinproError
from minpro_cli.fileio import (
    directory_done_marker,
    read_jsonl,
    read_yaml,
    write_directory_atomic,
    write_json_atomic,
    write_text_atomic,
    write_yaml_atomic,
)
from minpro_cli.rundir import (
    RECORD_FILES,
    RESTORED_FILE,
    SWEEP_MANIFEST,
    RunStatus,
    claim,
    owned,
    run_name,
    run_status,
)


@dataclass(frozen=True)
class SweepRun:
    name: str
    overrides: dict[str, Any]  # dotted key → value, the seed included
    directory: Path
    iterations: int

    def status(self) -> RunStatus:
        return run_status(self.directory)


def parse_grid(texts: list[str]) -> dict[str, list[Any]]:
    """`train.staleness=0,4,8` → {"train.staleness": [0, 4, 8]} (each value read as YAML)."""
    grid: dict[str, list[Any]] = {}
    for text in texts:
        key, sep, raw = text.partition("=")
        if not sep or not key.strip() or not raw.strip():
            raise ConfigError(f"--grid '{text}' is not KEY=V1,V2,… (for example train.staleness=0,4,8)")
        grid[key.strip()] = [parse_override(f"{key}={value}")[1] for value in raw.split(",")]
    return grid


def plan_runs(recipe_data: dict[str, Any], recipe: Recipe, sweep_dir: Path, where: str,
              records: Path | None = None) -> list[SweepRun]:
    """Every combination of grid values × seeds as a validated run recipe written to its directory
    (or, when `records` holds the run's record, the record restored there)."""
    grid = recipe.sweep.grid
    runs = []
    for values in product(*grid.values(), range(recipe.sweep.seeds)):
        overrides = dict(zip(grid, values[:-1])) | {"seed": recipe.seed + values[-1]}
        name = run_name(overrides)
        data = copy.deepcopy(recipe_data)
        data.pop("sweep", None)
        for key, value in overrides.items():
            set_dotted(data, key, value)
        directory = sweep_dir / "runs" / name
        data["run_dir"] = str(directory)
        run_recipe = recipe_from_data(data, f"{where}, run {name}")
        runs.append(SweepRun(name, overrides, directory, run_recipe.train.iterations))
        planned, written = dump_recipe(run_recipe), directory / "recipe.yaml"
        if records is not None and run_status(directory) == "pending":
            restore_record(records / name, directory, planned, where)
        if run_status(directory) == "pending":
            claim(directory)
            write_yaml_atomic(written, planned)
        elif written.exists() and not same_recipe(finished_recipe(written), planned):
            raise ConfigError(
                f"{where}: run {name} finished with a different recipe ({written}); a report would mix "
                "settings: sweep into a new directory (--out) or delete that run"
            )
    return runs


def restore_record(record: Path, directory: Path, planned: dict[str, Any], where: str) -> None:
    """A record (complete: its writer finished) copied into the run's directory, marker last."""
    if not directory_done_marker(record).exists():
        return
    if not same_recipe(finished_recipe(record / "recipe.yaml"), planned):
        raise ConfigError(f"{where}: the record {record} was made with a different recipe; give --records a "
                          "directory of this recipe's records, or delete that record to train the run again")
    claim(directory)
    for name in RECORD_FILES:
        if (record / name).exists():
            write_text_atomic(directory / name, (record / name).read_text(encoding="utf-8"))
    write_json_atomic(directory / RESTORED_FILE, {"record": str(record)})


def keep_record(run: SweepRun, records: Path) -> None:
    """A finished run's record, written once (atomically: a complete directory or none)."""
    if run.status() == "pending" or directory_done_marker(records / run.name).exists():
        return

    def fill(tmp: Path) -> None:
        for name in RECORD_FILES:
            if (run.directory / name).exists():
                shutil.copyfile(run.directory / name, tmp / name)

    write_directory_atomic(records / run.name, fill)


def same_recipe(finished: dict[str, Any], planned: dict[str, Any]) -> bool:
    """Equal but for run_dir (a record restored into another sweep directory keeps its first one)."""
    return {**finished, "run_dir": None} == {**planned, "run_dir": None}


def finished_recipe(path: Path) -> dict[str, Any]:
    """A run's recipe.yaml with today's defaults filled in: a section minpro added since the run
    finished (with its default) is not a different recipe."""
    return dump_recipe(recipe_from_data(read_yaml(path), str(path)))


def sweep_plan(path: Path, overrides: list[str], grid: list[str], seeds: int | None, quick: bool) -> tuple[
    Recipe, dict[str, Any]
]:
    """The sweep recipe with command-line grid/seeds (and the `--quick` changes) applied."""
    recipe = load_recipe(path, overrides)
    data = dump_recipe(recipe)
    sweep = data["sweep"]
    if quick:
        sweep["grid"] |= sweep["quick"]["grid"]
        sweep["seeds"] = sweep["quick"]["seeds"] or sweep["seeds"]
        for text in sweep["quick"]["overrides"]:
            set_dotted(data, *parse_override(text))
        data["run_dir"] = data["run_dir"].rstrip("/") + "-quick"
    sweep["grid"] |= parse_grid(grid)
    if seeds is not None:
        sweep["seeds"] = seeds
    recipe = recipe_from_data(data, str(path))
    if not recipe.sweep.grid:
        raise ConfigError(f"{path}: nothing to sweep: give sweep.grid in the recipe or --grid KEY=V1,V2")
    return recipe, data


def progress_of(runs: list[SweepRun], statuses: list[RunStatus]) -> int:
    """Rounds finished over all runs (a finished run counts in full)."""
    total = 0
    for run, status in zip(runs, statuses):
        metrics = run.directory / "metrics.jsonl"
        if status != "pending":
            total += run.iterations
        elif metrics.exists():
            total += min(len(read_jsonl(metrics, warn_incomplete=False)), run.iterations)  # being written
    return total


def start_run(run: SweepRun, threads: int | None) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    if threads is not None:  # torch reads these at import: each job gets its share of the cores
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(run.directory / "train.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "minpro_cli", "train", str(run.directory / "recipe.yaml")],
            stdout=log, stderr=subprocess.STDOUT, env=env | {DIE_WITH_PARENT: str(os.getpid())},
        )



def stop(active: dict[subprocess.Popen[bytes], SweepRun]) -> None:
    """Ctrl-C: let each run finish its current write (SIGINT), then make sure it is gone."""
    for proc in active:
        proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 30
    for proc in active:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()


def execute(runs: list[SweepRun], jobs: int, records: Path | None = None) -> list[SweepRun]:
    """Run every pending run, `jobs` at a time, under one progress bar; return the failed ones.
    With `records`, each run that finishes leaves its record there at once."""
    pending = [r for r in runs if r.status() == "pending"]
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    active: dict[subprocess.Popen[bytes], SweepRun] = {}
    failed: list[SweepRun] = []
    total = sum(r.iterations for r in runs)
    console.print(f"sweep: {len(runs)} runs, {len(runs) - len(pending)} already finished, {jobs} at a time")
    try:
        with progress_bar("sweep rounds", total=total) as bar:
            def show() -> None:
                statuses = [r.status() for r in runs]
                bar.set(progress_of(runs, statuses), f"{statuses.count('done')} done, {statuses.count('diverged')} diverged, "
                                           f"{len(failed)} failed, running: {', '.join(r.name for r in active.values())}")

            show()
            while pending or active:
                while pending and len(active) < jobs:
                    run = pending.pop(0)
                    active[start_run(run, threads)] = run
                time.sleep(1.0)
                for proc, run in list(active.items()):
                    if proc.poll() is None:
                        continue
                    del active[proc]
                    if records is not None:
                        keep_record(run, records)
                    if proc.returncode != 0 and run.status() == "pending":
                        failed.append(run)
                        console.print(f"run {run.name} failed (exit {proc.returncode}); see {run.directory}/train.log")
                show()
    except KeyboardInterrupt:
        stop(active)
        raise
    return failed


def run_sweep(path: Path, overrides: list[str], grid: list[str], seeds: int | None, quick: bool,
              jobs: int | None, out: Path | None, records: Path | None = None) -> Path:
    recipe, data = sweep_plan(path, overrides, grid, seeds, quick)
    sweep_dir = out or Path(recipe.run_dir)
    with owned(sweep_dir, "sweep"):
        return sweep_in(sweep_dir, recipe, data, path, quick, jobs, records)


def sweep_in(sweep_dir: Path, recipe: Recipe, data: dict[str, Any], path: Path, quick: bool, jobs: int | None,
             records: Path | None = None) -> Path:
    runs = plan_runs(data, recipe, sweep_dir, str(path), records)
    write_json_atomic(sweep_dir / SWEEP_MANIFEST, {
        "recipe": str(path),
        "quick": quick,
        "grid": recipe.sweep.grid,
        "seeds": recipe.sweep.seeds,
        "config": data,
        "runs": [{"name": r.name, "overrides": r.overrides} for r in runs],
    })
    if records is not None:  # runs finished before records were asked for
        for run in runs:
            keep_record(run, records)
    failed = execute(runs, jobs or recipe.sweep.jobs, records)
    diverged = [r.name for r in runs if r.status() == "diverged"]
    if diverged:
        console.print(f"diverged (recorded, not rerun): {', '.join(diverged)}")
    if failed:
        raise MinproError(
            f"{len(failed)} of {len(runs)} runs failed: {', '.join(r.name for r in failed)}; read their train.log, "
            "fix the cause and rerun the same command (finished runs are kept)"
        )
    console.print(f"sweep finished: {sweep_dir}")
    return sweep_dir
