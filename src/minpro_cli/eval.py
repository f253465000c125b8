"""`minpro eval`: avg@n (mean pass@1), unbiased pass@k, maj@k and the standard error of pass@1."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from rich.table import Table

from minpro_cli.collect import load_recipe_policy, sample_rows, sampling_job
from minpro_cli.config import BenchmarkConfig, Recipe, dump_recipe
from minpro_cli.console import console, print_metrics
from minpro_cli.errors import MinproError
from minpro_cli.fileio import write_json_atomic
from minpro_cli.modeling import EMBEDDED_MODELS, Policy
from minpro_cli.registry import load_plugin
from minpro_cli.rollouts import write_rollouts
from minpro_cli.tasks import load_problems


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 − C(n−c, k) / C(n, k), as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 ≤ c ≤ n and 1 ≤ k ≤ n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prob_all_fail = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_fail *= 1.0 - k / i
    return 1.0 - prob_all_fail


def majority_correct(samples: list[dict[str, Any]]) -> float:
    """1 if the most frequent extracted answer (ties: the one seen first) was scored correct.
    Answers are compared as extracted strings, so "1/2" and "0.5" count as different votes."""
    votes = [(json.loads(s["verifier_details"]).get("extracted"), s["reward"]) for s in samples]
    counted = Counter(answer for answer, _ in votes if answer is not None)
    if not counted:
        return 0.0
    top = max(counted.values())
    winner = next(answer for answer, _ in votes if answer is not None and counted[answer] == top)
    return float(any(answer == winner and reward >= 1.0 for answer, reward in votes))


def score_groups(rows: list[dict[str, Any]], n: int, ks: list[int]) -> dict[str, float]:
    """avg@n, pass@k (unbiased) and maj@k (the first k samples vote) over problems, and the
    standard error of pass@1 across problems."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["prompt_id"], []).append(r)
    for samples in groups.values():
        samples.sort(key=lambda s: s["sample_index"])
    per_problem = [sum(s["reward"] for s in g) / len(g) for g in groups.values()]
    n_problems = len(per_problem)
    mean = sum(per_problem) / n_problems
    spread = sum((p - mean) ** 2 for p in per_problem) / (n_problems - 1) if n_problems > 1 else 0.0
    scores = {"avg@n": sum(r["reward"] for r in rows) / len(rows), "pass@1_stderr": math.sqrt(spread / n_problems)}
    correct = [sum(int(s["reward"] >= 1.0) for s in g) for g in groups.values()]
    for k in ks:
        scores[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in correct) / n_problems
        scores[f"maj@{k}"] = sum(majority_correct(g[:k]) for g in groups.values()) / n_problems
    return scores


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


def benchmarks_of(recipe: Recipe) -> dict[str, BenchmarkConfig]:
    """The recipe's named benchmarks, or data.eval as the single unnamed one."""
    return recipe.eval.benchmarks or {"": BenchmarkConfig(data=recipe.data.eval, preset=recipe.data.preset)}


def evaluate_benchmark(recipe: Recipe, policy: Policy, bench: BenchmarkConfig) -> tuple[dict[str, Any], list]:
    d, cfg = recipe.data, recipe.eval
    problems = load_problems(
        bench.data, bench.question_field or d.question_field, bench.answer_field or d.answer_field,
        bench.id_field or d.id_field, bench.preset, d.eval_split, d.subset,
    )[: bench.max_problems or cfg.max_problems]
    job = sampling_job(recipe, policy)
    if bench.verifier is not None:
        job.verifier = load_plugin("verifiers", bench.verifier.name, bench.verifier.options)
        job.verifier_name = bench.verifier.name
    n = bench.n_samples or cfg.n_samples
    rows, _ = sample_rows(job, problems, n, recipe.seed, label=f"evaluating {Path(bench.data).stem}")
    failures = Counter(json.loads(r["verifier_details"]).get("failure") for r in rows)
    failures.pop(None, None)
    result = {"data": bench.data, "verifier": job.verifier_name, "n_problems": len(problems), "n_samples": n,
              **score_groups(rows, n, cfg.k), "failures": dict(failures.most_common())}
    return result, rows


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
    for name, bench in benchmarks_of(recipe).items():
        result, rows = evaluate_benchmark(recipe, policy, bench)
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
