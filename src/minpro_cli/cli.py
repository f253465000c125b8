"""The `minpro` command: parse arguments, load the recipe, call a stage. Nothing else."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from minpro_cli.cli_support import user_errors
from minpro_cli.cli_tools import convert_app, export_app, import_app, plugins_app
from minpro_cli.config import Recipe, load_recipe
from minpro_cli.console import console
from minpro_cli.errors import ConfigError

app = typer.Typer(no_args_is_help=True, help="RL post-training with the MinPRO objective.")

RecipeArg = Annotated[Path, typer.Argument(help="YAML recipe, e.g. recipes/quickstart.yaml")]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(
        help="dotted overrides, e.g. optim.lr=3e-5; sections: run_dir, seed, model, data, sampler, verifier, "
        "objective, rollout, train, optim, eval, logging, sweep. `minpro config RECIPE` prints every key with its value"
    ),
]


def _recipe(path: Path, overrides: list[str] | None) -> Recipe:
    return load_recipe(path, overrides or [])


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"minpro {version('minpro')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """RL post-training with the MinPRO objective."""


@app.command("config")
@user_errors
def config_(recipe: RecipeArg, overrides: OverridesArg = None) -> None:
    """Print the resolved recipe as YAML: every default, and every option of the selected plugins."""
    import yaml

    from minpro_cli.config import resolved_recipe

    typer.echo(yaml.safe_dump(resolved_recipe(_recipe(recipe, overrides)), sort_keys=False), nl=False)


@app.command()
@user_errors
def rollout(recipe: RecipeArg, overrides: OverridesArg = None) -> None:
    """Sample responses to training problems, score them, write a rollouts parquet file."""
    from minpro_cli.rollout import run_rollout

    run_rollout(_recipe(recipe, overrides))


@app.command()
@user_errors
def train(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    nproc: Annotated[
        int, typer.Option("--nproc", min=1, help="training processes on this machine (launches torchrun)")
    ] = 1,
    resume: Annotated[
        str,
        typer.Option(help="auto: the run's latest checkpoint, if its recipe matches | never: only a new run | "
                     "a checkpoint directory to continue from (later rounds of its run are dropped)"),
    ] = "auto",
) -> None:
    """Update the policy: an online rollout → update loop, or on stored rollouts (train.rollouts).

    With --nproc N (or under `torchrun -m minpro_cli train`) N processes share every update:
    DDP or FSDP2 per the recipe's `distributed` section."""
    loaded = _recipe(recipe, overrides)  # validated before any process starts
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        from minpro_cli.launcher import run_under_torchrun

        run_under_torchrun(nproc, ["train", str(recipe), *(overrides or []), f"--resume={resume}"], Path(loaded.run_dir))
        return
    from minpro_cli.train import run_train

    run_train(loaded, resume)


@app.command("sample-driver", hidden=True)
@user_errors
def sample_driver(run_dir: Annotated[Path, typer.Argument(help="the training run it samples for")]) -> None:
    """The dedicated sampler process `minpro train` starts (sampler.options.placement=dedicated)."""
    from minpro_cli.dedicated import serve

    serve(run_dir)


@app.command("eval")
@user_errors
def eval_(
    recipe: Annotated[Path | None, typer.Argument(help="YAML recipe, e.g. recipes/quickstart.yaml")] = None,
    overrides: OverridesArg = None,
    policy: Annotated[str | None, typer.Option(help="checkpoint directory (default: eval.policy / model.path)")] = None,
    output: Annotated[
        Path | None,
        typer.Option("--json", "--output", help="JSON output path (- : also print the result to stdout)"),
    ] = None,
    compare: Annotated[
        tuple[Path, Path] | None, typer.Option(help="print two result files A.json B.json side by side instead")
    ] = None,
) -> None:
    """avg@n, pass@k, maj@k and the standard error of pass@1 of a checkpoint on the eval split."""
    from minpro_cli.eval import compare_results, run_eval
    from minpro_cli.fileio import write_json_output

    if compare is not None:
        compare_results(*compare)
        return
    if recipe is None:
        raise ConfigError("give a recipe to evaluate, or --compare A.json B.json")
    loaded = _recipe(recipe, overrides)
    if policy is not None:
        loaded.eval.policy = policy
    to_stdout = output == Path("-")  # the files still go to their default place
    result = run_eval(loaded, None if to_stdout else output)
    if to_stdout:
        write_json_output(Path("-"), result)


@app.command("inspect-ratios")
@user_errors
def inspect_ratios(
    rollouts: Annotated[
        list[str], typer.Argument(help="parquet files, directories of them, or globs (a whole run)")
    ],
    policy: Annotated[
        str | None, typer.Option(help="checkpoint to score with; default: each file's target_logprobs column")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="sequences per forward pass")] = 64,
    eps_low: Annotated[
        float | None,
        typer.Option(min=0.0, help="clip fractions count ratios below 1 − eps_low [default: the rollouts' objective's]"),
    ] = None,
    eps_high: Annotated[
        float | None,
        typer.Option(min=0.0, help="clip fractions count ratios above 1 + eps_high [default: the rollouts' objective's]"),
    ] = None,
    threshold: Annotated[
        list[float] | None, typer.Option(help="report fractions below / above it (repeatable)")
    ] = None,
    by: Annotated[
        str | None,
        typer.Option(help="split the statistics: policy_version or staleness; position: the by-position tables only; "
                     "version_boundary: by distance from each response's first version switch"),
    ] = None,
    anchor: Annotated[
        str | None,
        typer.Option(help="checkpoint that sampled the rows, scored by the trainer: split ρ into the mismatch "
                     "π_anchor/μ and the drift π/π_anchor"),
    ] = None,
    policy_step: Annotated[
        int | None, typer.Option(help="optimizer step of --policy (for --by staleness; read from the checkpoint)")
    ] = None,
    worst: Annotated[int, typer.Option(min=0, help="list the K sequences with the smallest ρ̲ at their end")] = 5,
    json_path: Annotated[Path | None, typer.Option("--json", help="also write the report as JSON (- : stdout)")] = None,
    plot: Annotated[Path | None, typer.Option(help="write PNG plots into this directory")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="run model code shipped with the checkpoint")] = False,
) -> None:
    """Statistics of ρ_t, ρ̲_t, ρ̲_t·ρ_t and ρ_1:t of saved rollouts against a policy."""
    from minpro_cli.checkpoints import saved_policy_step
    from minpro_cli.inspect_ratios import InspectOptions, clip_range
    from minpro_cli.inspect_ratios import inspect_ratios as run
    from minpro_cli.modeling import load_policy
    from minpro_cli.ratiostats import DEFAULT_THRESHOLDS

    if by not in (None, "policy_version", "staleness", "position", "version_boundary"):
        raise ConfigError(f"--by must be policy_version, staleness, position or version_boundary, got {by!r}")
    thresholds = tuple(threshold) if threshold else DEFAULT_THRESHOLDS
    if any(t <= 0 for t in thresholds):
        raise ConfigError(f"--threshold values must be positive ratios, got {list(thresholds)}")
    scorer = load_policy(policy, trust_remote_code=trust_remote_code) if policy else None
    if policy_step is None and policy:
        policy_step = saved_policy_step(Path(policy))
    low, high = clip_range(rollouts, eps_low, eps_high)
    options = InspectOptions(batch_size, low, high, thresholds, by, policy_step, worst)  # type: ignore[arg-type]
    anchor_policy = load_policy(anchor, trust_remote_code=trust_remote_code) if anchor else None
    run(rollouts, scorer, options, json_path, plot, anchor_policy)


@app.command()
@user_errors
def probe(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    policy: Annotated[
        str | None, typer.Option(help="checkpoint π whose gradient is estimated [default with --run: its latest]")
    ] = None,
    behavior: Annotated[list[str] | None, typer.Option(help="checkpoint μ that samples (repeatable)")] = None,
    run: Annotated[Path | None, typer.Option(help="a run directory whose checkpoints are the behaviours")] = None,
    staleness: Annotated[str, typer.Option(help="with --run: optimizer steps from μ to π, comma-separated")] = "0,4,8,16",
    switch_at: Annotated[
        str | None,
        typer.Option(help="mixed-version samples: each behaviour's responses continue under π's weights from these "
                     "tokens on, comma-separated (`none`: also unswitched), e.g. none,8,16"),
    ] = None,
    objective: Annotated[
        list[str] | None, typer.Option(help="NAME or NAME:key=value,key=value (repeatable) [default: the recipe's]")
    ] = None,
    draws: Annotated[int, typer.Option(min=1, help="independent draws; numbers are mean ± s.e. over them")] = 3,
    prompts: Annotated[int | None, typer.Option(min=1, help="prompts per sample [default: train.prompts_per_iteration]")] = None,
    reference_multiple: Annotated[int, typer.Option(min=2, help="g★ uses this many samples of the same size")] = 8,
    json_path: Annotated[Path | None, typer.Option("--json", help="write the results as JSON (- : stdout)")] = None,
    plot: Annotated[Path | None, typer.Option(help="write probe.png into this directory")] = None,
) -> None:
    """How close each objective's off-policy gradient comes to π's on-policy gradient, per behaviour μ."""
    from minpro_cli.fileio import write_json_output
    from minpro_cli.probe import Behavior, behaviors_of_run, print_cells, report, run_probe

    config = _recipe(recipe, overrides)
    if (run is None) == (not behavior):
        raise ConfigError("give --behavior CKPT (repeatable) with --policy, or --run RUN_DIR with --staleness")
    if run is not None:
        try:
            steps = [int(s) for s in staleness.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"--staleness must be comma-separated integers, got {staleness!r}") from None
        policy_path, behaviors = behaviors_of_run(run, steps, policy)
    elif policy is None:
        raise ConfigError("--behavior needs --policy (the checkpoint whose gradient is estimated)")
    else:
        policy_path, behaviors = policy, [Behavior(b, b) for b in behavior or []]
    if switch_at is not None:
        try:
            points = [None if k.strip() == "none" else int(k) for k in switch_at.split(",") if k.strip()]
        except ValueError:
            raise ConfigError(f"--switch-at must be comma-separated token positions or none, got {switch_at!r}") from None
        if any(k is not None and k < 1 for k in points):
            raise ConfigError(f"--switch-at positions are response tokens from 1 on, got {switch_at!r}")
        behaviors = [b.switched(k) for b in behaviors for k in points]
    cells = run_probe(config, policy_path, behaviors, objective or [], draws, prompts, reference_multiple)
    print_cells(cells)
    settings = {"draws": draws, "prompts": prompts or config.train.prompts_per_iteration,
                "group_size": config.train.group_size, "reference_multiple": reference_multiple}  # fmt: skip
    if json_path is not None:
        write_json_output(json_path, report(cells, policy_path, settings))
    if plot is not None:
        from minpro_cli.plots import probe_figure, save

        console.print(f"plot: {save(probe_figure(cells), plot / 'probe.png')}")


@app.command()
@user_errors
def doctor(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    policy: Annotated[str | None, typer.Option(help="checkpoint to check [default: model.path]")] = None,
    prompts: Annotated[int, typer.Option(min=1, help="training prompts drawn, × train.group_size responses")] = 8,
    json_path: Annotated[Path | None, typer.Option("--json", help="write the verdicts as JSON (- : stdout)")] = None,
    html: Annotated[Path | None, typer.Option(help="write a self-contained HTML page of the verdicts and tokens")] = None,
    strict: Annotated[bool, typer.Option(help="a warning fails too (exit 2)")] = False,
) -> None:
    """Whether the sampler, trainer and data agree: ok / warn / fail per check, exit code 0 / 1 / 2."""
    from minpro_cli.doctor import run_doctor

    raise typer.Exit(run_doctor(_recipe(recipe, overrides), recipe, policy, prompts, json_path, html, strict))


@app.command()
@user_errors
def sweep(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    grid: Annotated[
        list[str] | None, typer.Option(help="KEY=V1,V2,… swept recipe key (repeatable; adds to sweep.grid)")
    ] = None,
    seeds: Annotated[int | None, typer.Option(min=1, help="runs per grid point (default sweep.seeds)")] = None,
    jobs: Annotated[int | None, typer.Option(min=1, help="runs at a time (default sweep.jobs)")] = None,
    quick: Annotated[bool, typer.Option(help="the recipe's smaller sweep.quick version, in RUN_DIR-quick")] = False,
    out: Annotated[Path | None, typer.Option(help="sweep directory (default: the recipe's run_dir)")] = None,
    report: Annotated[bool, typer.Option(help="write the report when every run has finished")] = True,
    records: Annotated[Path | None, typer.Option(
        help="keep each finished run's record here (kilobytes, to commit) and restore runs from it instead of training"
    )] = None,
) -> None:
    """Train every combination of grid values × seeds; finished runs are kept, the rest resume."""
    from minpro_cli.report import write_report
    from minpro_cli.sweep import run_sweep

    sweep_dir = run_sweep(recipe, overrides or [], grid or [], seeds, quick, jobs, out, records)
    if report:
        write_report(sweep_dir)


@app.command("report")
@user_errors
def report_(
    sweep_dir: Annotated[Path, typer.Argument(help="a directory written by `minpro sweep`")],
    out: Annotated[Path | None, typer.Option(help="markdown file; figures go next to it (default SWEEP_DIR/report.md)")] = None,
    line: Annotated[str | None, typer.Option(help="grid key drawn as lines (default objective.name)")] = None,
    reference: Annotated[str, typer.Option(help="the line compared against every other in the reading")] = "minpro",
    collapse_fraction: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="collapsed: held-out pass@1 stays below this × its best")
    ] = 0.5,
    notes: Annotated[Path | None, typer.Option(help="markdown written by hand, included under 'Notes'")] = None,
    probe: Annotated[Path | None, typer.Option(help="a `minpro probe --json` file: its table and figure")] = None,
) -> None:
    """Markdown report with PNG figures of a sweep: curves per panel, a table over seeds, every run."""
    from minpro_cli.report import write_report

    write_report(sweep_dir, out, line, reference, collapse_fraction, notes, probe)


@app.command()
@user_errors
def plot(run_dir: Annotated[Path, typer.Argument(help="a run directory written by `minpro train`")]) -> None:
    """Training curves (reward, entropy, grad norm, ratio statistics) → RUN_DIR/plots/training.png."""
    from minpro_cli.plots import plot_run

    console.print(f"plot: {plot_run(run_dir)}")


app.add_typer(convert_app, name="convert")
app.add_typer(plugins_app, name="plugins")
app.add_typer(export_app, name="export")
app.add_typer(import_app, name="import")


def main() -> None:
    app(prog_name="minpro")


if __name__ == "__main__":
    sys.exit(main())
