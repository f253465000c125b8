"""`minpro eval`: pass@1 (mean over n samples) and unbiased pass@k of a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from minpro_cli.collect import load_recipe_policy, load_split, sample_rows, sampling_job
from minpro_cli.config import Recipe, dump_recipe
from minpro_cli.console import print_metrics
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


def score_groups(rows: list[dict[str, Any]], n: int, ks: list[int]) -> dict[str, float]:
    correct: dict[str, int] = {}
    for r in rows:
        correct[r["prompt_id"]] = correct.get(r["prompt_id"], 0) + int(r["reward"] >= 1.0)
    scores = {f"pass@{k}": sum(pass_at_k(n, c, k) for c in correct.values()) / len(correct) for k in ks}
    scores["avg@n"] = sum(r["reward"] for r in rows) / len(rows)
    return scores


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
    shown = ["n_problems", "n_samples", "avg@n", *[f"pass@{k}" for k in cfg.k]]
    print_metrics(
        f"eval of {policy_path} on {recipe.data.eval} → {out}",
        {k: f"{result[k]:.4f}" if isinstance(result[k], float) else str(result[k]) for k in shown},
    )
    return result
