"""`minpro eval`: avg@n (mean pass@1), unbiased pass@k, maj@k and the standard error of pass@1."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from rich.table import Table

from minpro_cli.collect import load_recipe_policy, load_split, sample_rows, sampling_job
from minpro_cli.config import Recipe, dump_recipe
from minpro_cli.console import console, print_metrics
from minpro_cli.errors import MinproError
from minpro_cli.fileio import write_json_atomic
from minpro_cli.modeling import EMBEDDED_MODEL
from minpro_cli.rollouts import write_rollouts


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
    for k in ks:
        correct = [sum(int(s["reward"] >= 1.0) for s in g) for g in groups.values()]
        scores[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in correct) / n_problems
        scores[f"maj@{k}"] = sum(majority_correct(g[:k]) for g in groups.values()) / n_problems
    return scores


def compare_results(first: Path, second: Path) -> dict[str, tuple[float, float]]:
    """Print two eval JSON files side by side with their differences; return the shared metrics."""
    loaded = []
    for path in (first, second):
        try:
            loaded.append(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise MinproError(f"eval result not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise MinproError(f"{path}: not an eval result (invalid JSON: {exc.msg})") from None
    a, b = loaded
    shared = {
        k: (float(a[k]), float(b[k]))
        for k in a
        if k in b and isinstance(a[k], int | float) and isinstance(b[k], int | float) and not isinstance(a[k], bool)
    }
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
    return EMBEDDED_MODEL if path == EMBEDDED_MODEL else Path(path).resolve().name


def run_eval(recipe: Recipe, output: Path | None = None) -> dict[str, Any]:
    cfg = recipe.eval
    policy_path = cfg.policy or recipe.model.path
    policy = load_recipe_policy(recipe, policy_path)
    problems = load_split(recipe, "eval")[: cfg.max_problems]
    rows, _ = sample_rows(sampling_job(recipe, policy), problems, cfg.n_samples, recipe.seed, label="evaluating")
    result = {
        "policy": policy_path,
        "data": recipe.data.eval,
        "n_problems": len(problems),
        "n_samples": cfg.n_samples,
        **score_groups(rows, cfg.n_samples, cfg.k),
    }
    out = output or Path(recipe.run_dir) / "eval" / f"{policy_label(policy_path)}.json"
    write_json_atomic(out, {**result, "config": dump_recipe(recipe)})
    write_rollouts(out.with_suffix(".samples.parquet"), rows, dump_recipe(recipe))
    shown = ["n_problems", "n_samples", "avg@n", "pass@1_stderr", *[f"pass@{k}" for k in cfg.k],
             *[f"maj@{k}" for k in cfg.k]]
    print_metrics(
        f"eval of {policy_path} on {recipe.data.eval} → {out}",
        {k: f"{result[k]:.4f}" if isinstance(result[k], float) else str(result[k]) for k in shown},
    )
    return result
