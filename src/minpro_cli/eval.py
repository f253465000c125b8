"""`minpro eval`: held-out scores of a policy on each benchmark (see `heldout.py`), written as
JSON with the scored samples, and `--compare` of two such results."""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from minpro_cli.config import Recipe, dump_recipe
from minpro_cli.console import console, print_metrics, titled_table
from minpro_cli.errors import MinproError
from minpro_cli.fileio import write_json_atomic
from minpro_cli.heldout import (
    benchmarks_of,
    evaluate_benchmark,
    pass_at_k,  # noqa: F401  (deprecated here: import it from minpro_cli.heldout)
)
from minpro_cli.modeling import EMBEDDED_MODELS
from minpro_cli.rollouts import write_rollouts
from minpro_cli.rundir import check_replaceable, owned, writes_into
from minpro_cli.sampling import Plugins, load_recipe_policy


def flatten_numbers(result: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves as 'benchmarks/math500/pass@1' → value (the recipe under 'config' is skipped)."""
    out: dict[str, float] = {}
    for key, value in result.items():
        if key == "config":
            continue
        if isinstance(value, dict):
            out |= flatten_numbers(value, f"{prefix}{key}/")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


def compare_results(first: Path, second: Path) -> dict[str, tuple[float, float]]:
    """Print two eval JSON files side by side with their differences; return the shared metrics."""
    loaded = []
    for path in (first, second):
        if not path.is_file():
            raise MinproError(f"eval result not found: {path} (give two JSON files `minpro eval` wrote)")
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MinproError(f"{path}: not an eval result (not JSON text: {exc})") from None
        if not isinstance(result, dict):
            raise MinproError(f"{path}: not an eval result (a JSON {type(result).__name__}, not an object)")
        loaded.append(result)
    a, b = (flatten_numbers(x) for x in loaded)
    shared = {k: (a[k], b[k]) for k in a if k in b}
    if not shared:
        raise MinproError(f"{first} and {second} share no numeric metrics: are both `minpro eval` results?")
    table = titled_table(f"{first.name} vs {second.name}")
    for column in ("metric", str(first), str(second), "difference"):
        table.add_column(column, justify="right")
    for key, (x, y) in shared.items():
        table.add_row(key, f"{x:.4g}", f"{y:.4g}", f"{y - x:+.4g}")
    console.print(table)
    return shared


def policy_label(path: str, eval_dir: Path) -> str:
    """`final`, `round_00002`, `embedded`: the policy's name, unless `eval_dir` already holds a
    result of another policy of that name (runs/a/final vs runs/b/final): then the name plus a
    hash of the path, so neither overwrites the other."""
    if path in EMBEDDED_MODELS:
        return path.replace(":", "-")
    name = Path(path).resolve().name
    earlier = eval_dir / f"{name}.json"
    try:
        recorded = json.loads(earlier.read_text(encoding="utf-8")).get("policy") if earlier.is_file() else None
    except (ValueError, UnicodeDecodeError, AttributeError):
        recorded = None
    if recorded is None or same_policy(recorded, path):
        return name
    return f"{name}-{hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:8]}"


def same_policy(recorded: str, path: str) -> bool:
    return recorded == path or (recorded not in EMBEDDED_MODELS and Path(recorded).resolve() == Path(path).resolve())


def eval_output(recipe: Recipe, policy_path: str, output: Path | None) -> Path:
    """Where the result goes; an --output outside the run directory must not replace a file
    minpro did not write (checked before any sampling)."""
    run_dir = Path(recipe.run_dir)
    out = output or run_dir / "eval" / f"{policy_label(policy_path, run_dir / 'eval')}.json"
    if not writes_into(run_dir, out):
        for path in (out, out.with_suffix(".samples.parquet")):
            check_replaceable(path, "eval --output")
    return out


def run_eval(recipe: Recipe, output: Path | None = None) -> dict[str, Any]:
    """One benchmark: `eval/<policy>.json` + `.samples.parquet`. Several: one such pair per
    benchmark under `eval/<policy>/`, and `eval/<policy>.json` with all of them and their
    unweighted average."""
    cfg = recipe.eval
    policy_path = cfg.policy or recipe.model.path
    policy = load_recipe_policy(recipe, policy_path)  # a bad checkpoint is refused before anything is written
    out = eval_output(recipe, policy_path, output)
    config = dump_recipe(recipe)
    shown = ["n_problems", "n_samples", "avg@n", "pass@1_stderr", *[f"pass@{k}" for k in cfg.k],
             *[f"maj@{k}" for k in cfg.k]]
    results: dict[str, dict[str, Any]] = {}
    plugins, run_dir = Plugins.of(recipe), Path(recipe.run_dir)
    # claimed as every stage claims it, but not locked: an evaluation may run beside training
    with owned(run_dir, lock=False) if writes_into(run_dir, out) else nullcontext():
        for name, bench in benchmarks_of(recipe).items():
            result, rows = evaluate_benchmark(recipe, policy, plugins, name, bench)
            results[name] = result
            target = out if not name else out.with_suffix("") / f"{name}.json"
            write_rollouts(target.with_suffix(".samples.parquet"), rows, config)  # the result JSON last:
            write_json_atomic(target, {"policy": policy_path, **result, "config": config})  # it exists only with them
    if "" in results:
        result = {"policy": policy_path, **results[""]}
        print_metrics(f"eval of {policy_path} on {result['data']} → {out}",
                      {k: f"{result[k]:.4f}" if isinstance(result[k], float) else str(result[k]) for k in shown})
        print_failures(result["failures"])
        return result
    metrics = [k for k in shown if k not in ("n_problems", "n_samples")]
    average = {k: sum(r[k] for r in results.values()) / len(results) for k in metrics}
    summary = {"policy": policy_path, "benchmarks": results, "avg": average}
    write_json_atomic(out, {**summary, "config": config})
    print_summary(summary, metrics, out)
    for name, result in results.items():
        print_failures(result["failures"], name)
    return summary


def print_failures(failures: dict[str, int], label: str = "") -> None:
    if failures:
        counts = ", ".join(f"{reason}: {count}" for reason, count in failures.items())
        console.print(f"scored 0 {f'on {label} ' if label else ''}because: {counts}", markup=False)


def print_summary(summary: dict[str, Any], metrics: list[str], out: Path) -> None:
    table = titled_table(f"eval of {summary['policy']} → {out}")
    for column in ("benchmark", "problems", "n", *metrics):
        table.add_column(column, justify="right")
    for name, r in summary["benchmarks"].items():
        table.add_row(name, str(r["n_problems"]), str(r["n_samples"]), *[f"{r[k]:.4f}" for k in metrics])
    table.add_row("avg", "", "", *[f"{summary['avg'][k]:.4f}" for k in metrics], style="bold")
    console.print(table)
