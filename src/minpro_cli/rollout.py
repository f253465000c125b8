"""`minpro rollout`: problems × group size → responses → rewards → a rollouts parquet file."""

from __future__ import annotations

import contextlib
from pathlib import Path

from minpro_cli.config import Recipe, dump_recipe
from minpro_cli.console import print_metrics
from minpro_cli.fileio import write_yaml_atomic
from minpro_cli.rollouts import write_rollouts
from minpro_cli.rundir import check_replaceable, owned, writes_into
from minpro_cli.sampling import Plugins, load_recipe_policy, load_split, sample_rows, sampling_job, summarize_rows


def run_rollout(recipe: Recipe) -> Path:
    out = recipe.run_path(recipe.rollout.output)
    inside = writes_into(Path(recipe.run_dir), out)
    if not inside:
        for path in (out, out.with_suffix(".config.yaml")):
            check_replaceable(path, "rollout.output")
    with owned(Path(recipe.run_dir)) if inside else contextlib.nullcontext():  # never someone else's directory
        policy = load_recipe_policy(recipe)
        problems = load_split(recipe, "train")[: recipe.rollout.num_prompts]
        job = sampling_job(recipe, policy, Plugins.of(recipe))
        rows, tokens_per_s = sample_rows(job, problems, recipe.rollout.group_size, recipe.seed)
        write_rollouts(out, rows, dump_recipe(recipe))
        write_yaml_atomic(out.with_suffix(".config.yaml"), dump_recipe(recipe))
    stats = summarize_rows(rows) | {"tokens_per_s": tokens_per_s}
    formatted = {k: f"{v:.0f}" if k == "tokens_per_s" else f"{v:.3f}" for k, v in stats.items()}
    print_metrics(f"rollout → {out}", {"responses": str(len(rows)), **formatted})
    return out
