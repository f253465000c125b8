"""`minpro doctor`: whether a recipe's sampler, trainer and data agree, as verdicts.

A small fixed batch of the recipe's training prompts (seeded) is drawn with its own sampler
and checked (`checks.py`): the sampler's log-probs against the trainer's forward (parity), which
distribution they belong to (processed vs raw), the trainer's invariance to batching, the
tokenizer, truncated sampling with prefix objectives, and the reward. Each check gives ok /
warn / fail, the number, the threshold and what to do; the exit code is the worst verdict
(0 / 1 / 2, a warning counts as a failure with --strict). docs/doctor.md documents the JSON.
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path
from typing import Any

import torch

from minpro_cli.config import Recipe
from minpro_cli.console import console, titled_table
from minpro_cli.doctor import checks
from minpro_cli.doctor.checks import Draw
from minpro_cli.doctor.findings import COLOURS_TEXT, Finding, exit_code, worst
from minpro_cli.doctor.forward import processed_logprobs, trainer_logprobs
from minpro_cli.doctor.page import ResponseView, render
from minpro_cli.fileio import write_json_output, write_text_atomic
from minpro_cli.objectives.logratios import log_min_prefix_ratio
from minpro_cli.sampling import Plugins, SamplingJob, load_recipe_policy, load_split, sample_rows, sampling_job
from minpro_cli.tasks import Problem

JSON_SCHEMA = 1
PAGE_RESPONSES = 16  # responses shown on the HTML page


@dataclasses.dataclass
class Diagnosis:
    findings: list[Finding]
    views: list[ResponseView]
    settings: dict[str, Any]


def draw(job: SamplingJob, problems: list[Problem], group_size: int, seed: int, label: str) -> Draw:
    rows, _ = sample_rows(job, problems, group_size, seed, label=label)
    sampler = job.sampler
    return Draw(rows, sampler.temperature, sampler.top_p, sampler.top_k)


def probe_sampler(sampler: Any) -> Any | None:
    """The sampler at T = 0.7, top-p = 0.9 (a copy), or None if its options cannot be changed."""
    copy = getattr(sampler, "model_copy", None)
    if copy is None:
        return None
    return copy(update={"temperature": checks.PROBE_TEMPERATURE, "top_p": checks.PROBE_TOP_P, "top_k": 0})


def diagnose(recipe: Recipe, job: SamplingJob, plugins: Plugins, n_prompts: int) -> Diagnosis:
    """Every check on `n_prompts` training prompts × train.group_size responses."""
    everything = load_split(recipe, "train")
    problems = [everything[i] for i in sorted(random.Random(recipe.seed).sample(range(len(everything)),
                                                                               min(n_prompts, len(everything))))]  # fmt: skip
    policy, group = job.policy, recipe.train.group_size
    main = draw(job, problems, group, recipe.seed, "doctor: sampling")
    trainer = trainer_logprobs(policy, main.prompts, main.responses, main.temperature)
    reference = (processed_logprobs(policy, main.prompts, main.responses, main.temperature, main.top_p, main.top_k)
                 if main.truncated else trainer)  # fmt: skip
    findings = [checks.parity(main, trainer, reference, policy.compute_dtype)]
    varied = probe_sampler(job.sampler)
    if varied is None:
        findings.append(checks.processed_unavailable())
    else:
        tempered = draw(dataclasses.replace(job, sampler=varied), problems, 2, recipe.seed + 1, "doctor: T = 0.7, top-p")
        findings.append(checks.processed(policy, tempered))
    findings += [
        checks.invariance(policy, main, main.temperature, recipe.train.micro_batch_tokens),
        checks.round_trip(job, main, problems),
        checks.special_tokens(job),
        checks.truncation(main, getattr(job.sampler, "max_new_tokens", None)),
        checks.truncated_sampling(main, trainer, plugins.objective, recipe.objective.name),
        checks.references(plugins.verifier, recipe.verifier.name, problems),
        checks.signal(main),
        checks.reward_time(plugins.verifier, main),
        checks.precision(policy, getattr(job.sampler, "dtype", None)),
    ]
    settings = {"prompts": len(problems), "group_size": group, "responses": len(main.rows), "seed": recipe.seed,
                "sampler": recipe.sampler.name, "sampler_dtype": getattr(job.sampler, "dtype", None),
                "trainer_dtype": str(policy.compute_dtype).removeprefix("torch."),
                "temperature": main.temperature, "top_p": main.top_p, "top_k": main.top_k}  # fmt: skip
    return Diagnosis(findings, response_views(job, main, trainer), settings)


def response_views(job: SamplingJob, main: Draw, trainer: list[torch.Tensor]) -> list[ResponseView]:
    tok = job.policy.tokenizer
    views = []
    for row, pi, mu in list(zip(main.rows, trainer, main.recorded))[:PAGE_RESPONSES]:
        log_rho = (pi - mu).double()[None]
        min_prefix = log_min_prefix_ratio(log_rho, torch.ones_like(log_rho, dtype=torch.bool)).exp()[0]
        views.append(ResponseView(row.prompt, [tok.decode([t]) for t in row.response_token_ids],
                                  (pi - mu).abs().tolist(), min_prefix.tolist(), row.reward))  # fmt: skip
    return views


def print_findings(findings: list[Finding]) -> None:
    table = titled_table(f"minpro doctor: {worst(findings)}")
    for column in ("check", "verdict", "value", "threshold", "what to do"):
        table.add_column(column, overflow="fold")
    for f in findings:
        value = "" if f.value is None else f"{f.value:.4g}"
        table.add_row(f.title, f"[{COLOURS_TEXT[f.verdict]}]{f.verdict}[/]", value, f.threshold, f.advice)
    console.print(table)


def run_doctor(
    recipe: Recipe, recipe_path: Path, policy_path: str | None, n_prompts: int, json_path: Path | None,
    html_path: Path | None, strict: bool,
) -> int:  # fmt: skip
    """Run every check, print the table, write the reports; the exit code."""
    started = time.perf_counter()
    plugins = Plugins.of(recipe)
    policy = load_recipe_policy(recipe, policy_path)
    diagnosis = diagnose(recipe, sampling_job(recipe, policy, plugins), plugins, n_prompts)
    code = exit_code(diagnosis.findings, strict)
    print_findings(diagnosis.findings)
    if json_path is not None:
        write_json_output(json_path, {
            "schema": JSON_SCHEMA, "verdict": worst(diagnosis.findings), "exit_code": code, "recipe": str(recipe_path),
            "policy": str(policy.path), "seconds": time.perf_counter() - started, "settings": diagnosis.settings,
            "checks": [dataclasses.asdict(f) for f in diagnosis.findings],
        })  # fmt: skip
    if html_path is not None:
        scale = 10 * checks.tolerance(checks.PARITY_TOLERANCE, policy.compute_dtype)
        write_text_atomic(html_path, render(f"minpro doctor {recipe_path.name}", diagnosis.findings, diagnosis.views,
                                            scale))  # fmt: skip
        console.print(f"html: {html_path}")
    return code
