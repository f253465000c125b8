"""`minpro eval`: held-out scores of a policy on each benchmark (see `heldout.py`), written as
JSON with the scored samples, and `--compare` of two such results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table

from minpro_cli.config import Recipe, dump_recipe
from minpro_cli.console import console, print_metrics
from minpro_cli.errors import MinproError
from minpro_cli.fileio import write_json_atomic
from minpro_cli.heldout import (
    benchmarks_of,
    evaluate_benchmark,
    pass_at_k,  # noqa: F401  (deprecated here: import it from minpro_cli.heldout)
)
from minpro_cli.modeling import EMBEDDED_MODELS
from minpro_cli.rollouts import write_rollouts
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
    table = Table(title=f"{first.name} vs {second.name}")
    for column in ("metric", str(first), str(second), "difference"):
        table.add_column(column, justify="right")
    for key, (x, y) in shared.items():
        table.add_row(key, f"{x:.4g}", f"{y:.4g}", f"{y - x:+.4g}")
    console.print(table)
    return shared


def policy_label(path: str) -> str:
    return path.replace(":", "-") if path in EMBEDDED_MODELS else Path(path).resolve().name


def run_eval(recipe: Recipe, output: Path | None = None) -> dict[str, Any]:
    """One benchmark: `eval/<policy>.json` + `.samples.parquet`. Several: one such pair per
    benchmark under `eval/<policy>/`, and `eval/<policy>.json` with all of them and their
    unweighted average."""
    cfg = recipe.eval
    policy_path = cfg.policy or recipe.model.path
    policy = load_recipe_policy(recipe, policy_path)
    out = output or Path(recipe.run_dir) / "eval" / f"{policy_label(policy_path)}.json"
    config = dump_recipe(recipe)
    shown = ["n_problems", "n_samples", "avg@n", "pass@1_stderr", *[f"pass@{k}" for k in cfg.k],
             *[f"maj@{k}" for k in cfg.k]]
    results: dict[str, dict[str, Any]] = {}
    plugins = Plugins.of(recipe)
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
    table = Table(title=f"eval of {summary['policy']} → {out}")
    for column in ("benchmark", "problems", "n", *metrics):
        table.add_column(column, justify="right")
    for name, r in summary["benchmarks"].items():
        table.add_row(name, str(r["n_problems"]), str(r["n_samples"]), *[f"{r[k]:.4f}" for k in metrics])
    table.add_row("avg", "", "", *[f"{summary['avg'][k]:.4f}" for k in metrics], style="bold")
    console.print(table)
