"""Held-out evaluation, shared by `minpro eval` and the trainer's periodic evaluations: one
benchmark sampled and scored as avg@n (mean pass@1), unbiased pass@k, maj@k and the standard
error of pass@1."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from minpro_cli.config import Recipe
from minpro_cli.modeling import Policy
from minpro_cli.rollouts import RolloutRow
from minpro_cli.sampling import Plugins, sample_rows, sampling_job
from minpro_cli.sections import BenchmarkConfig
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


def majority_correct(samples: list[RolloutRow]) -> float:
    """1 if the most frequent extracted answer (ties: the one seen first) was scored correct.
    Answers are compared as extracted strings, so "1/2" and "0.5" count as different votes."""
    votes = [(json.loads(s.verifier_details).get("extracted"), s.reward) for s in samples]
    counted = Counter(answer for answer, _ in votes if answer is not None)
    if not counted:
        return 0.0
    top = max(counted.values())
    winner = next(answer for answer, _ in votes if answer is not None and counted[answer] == top)
    return float(any(answer == winner and reward >= 1.0 for answer, reward in votes))


def score_groups(rows: list[RolloutRow], n: int, ks: list[int]) -> dict[str, float]:
    """avg@n, pass@k (unbiased) and maj@k (the first k samples vote) over problems, and the
    standard error of pass@1 across problems."""
    groups: dict[str, list[RolloutRow]] = {}
    for r in rows:
        groups.setdefault(r.prompt_id, []).append(r)
    for samples in groups.values():
        samples.sort(key=lambda s: s.sample_index)
    per_problem = [sum(s.reward for s in g) / len(g) for g in groups.values()]
    n_problems = len(per_problem)
    mean = sum(per_problem) / n_problems
    spread = sum((p - mean) ** 2 for p in per_problem) / (n_problems - 1) if n_problems > 1 else 0.0
    scores = {"avg@n": sum(r.reward for r in rows) / len(rows), "pass@1_stderr": math.sqrt(spread / n_problems)}
    correct = [sum(int(s.reward >= 1.0) for s in g) for g in groups.values()]
    for k in ks:
        scores[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in correct) / n_problems
        scores[f"maj@{k}"] = sum(majority_correct(g[:k]) for g in groups.values()) / n_problems
    return scores


def benchmarks_of(recipe: Recipe) -> dict[str, BenchmarkConfig]:
    """The recipe's named benchmarks, or data.eval as the single unnamed one."""
    return recipe.eval.benchmarks or {"": BenchmarkConfig(data=recipe.data.eval, preset=recipe.data.preset)}


def evaluate_benchmark(
    recipe: Recipe, policy: Policy, plugins: Plugins, name: str, bench: BenchmarkConfig
) -> tuple[dict[str, Any], list[RolloutRow]]:
    """Sample and score benchmark `name` (its own verifier when it names one)."""
    d, cfg = recipe.data, recipe.eval
    problems = load_problems(
        bench.data, bench.question_field or d.question_field, bench.answer_field or d.answer_field,
        bench.id_field or d.id_field, bench.preset, d.eval_split, d.subset,
    )[: bench.max_problems or cfg.max_problems]
    job = sampling_job(recipe, policy, plugins)
    if bench.verifier is not None:
        job.verifier, job.verifier_name = plugins.benchmark_verifiers[name], bench.verifier.name
    n = bench.n_samples or cfg.n_samples
    rows, _ = sample_rows(job, problems, n, recipe.seed, label=f"evaluating {Path(bench.data).stem}")
    failures = Counter(json.loads(r.verifier_details).get("failure") for r in rows)
    failures.pop(None, None)
    result = {"data": bench.data, "verifier": job.verifier_name, "n_problems": len(problems), "n_samples": n,
              **score_groups(rows, n, cfg.k), "failures": dict(failures.most_common())}
    return result, rows
