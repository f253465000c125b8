"""The recipe shared by every stage (its sections are in `sections`), YAML recipe files and
dotted command-line overrides.

One recipe file configures all stages; each stage reads the sections it needs. Unknown
keys and wrong types are errors that name the key and the recipe file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from minpro_cli.correction import CorrectionConfig
from minpro_cli.errors import ConfigError, PluginError
from minpro_cli.fileio import read_yaml
from minpro_cli.registry import Kind, format_validation_error, load_plugin
from minpro_cli.sections import (
    DataConfig,
    DistributedConfig,
    EvalConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    PluginRef,
    RolloutConfig,
    Section,
    SweepConfig,
    TrainConfig,
)


class Recipe(Section):
    run_dir: str = "runs/default"
    seed: int = Field(0, ge=0, lt=2**63, description="the seed every stage derives its randomness from")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    sampler: PluginRef = Field(default_factory=lambda: PluginRef(name="hf"))
    verifier: PluginRef = Field(default_factory=lambda: PluginRef(name="math"))
    objective: PluginRef = Field(default_factory=lambda: PluginRef(name="minpro"))
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    correction: CorrectionConfig = Field(default_factory=CorrectionConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _correction_needs_an_anchor(self) -> Recipe:
        if self.correction.enabled and self.train.anchor == "behavior":
            raise ValueError(
                "correction: with train.anchor=behavior the behaviour factor π_old/μ is 1 and there is nothing to "
                "correct; set train.anchor=sampling_weights (the sampler's mismatch alone) or round_start / loglinear"
            )
        return self

    def plugin(self, kind: Kind) -> Any:
        ref: PluginRef = getattr(self, kind[:-1])
        return load_plugin(kind, ref.name, ref.options)

    def run_path(self, relative: str) -> Path:
        path = Path(relative)
        return path if path.is_absolute() else Path(self.run_dir) / path


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{key}' is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`optim.lr=3e-5` → ("optim.lr", 3e-5); the value is read as YAML (numbers, bools, lists)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' is not KEY=VALUE (for example optim.lr=3e-5)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads 3e-5 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip(), value


def load_recipe(path: Path | None, overrides: list[str] | None = None) -> Recipe:
    source = str(path) if path is not None else "defaults"
    data: dict[str, Any] = {}
    if path is not None:
        loaded = read_yaml(path)
        if loaded is None:
            raise ConfigError(
                f"{path}: the recipe is empty (or only comments); give at least the sections that differ from the "
                "defaults, e.g. recipes/quickstart.yaml"
            )
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded
    overridden = []
    for text in overrides or []:
        key, value = parse_override(text)
        set_dotted(data, key, value)
        overridden.append(key)
    return recipe_from_data(data, source + (f" (with overrides {', '.join(overridden)})" if overridden else ""))


def recipe_from_data(data: dict[str, Any], where: str) -> Recipe:
    """Validate a recipe mapping and its plugins' options; errors name `where` and the key."""
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {format_validation_error(exc, model=Recipe)}") from None
    for kind in ("objectives", "verifiers", "samplers"):
        try:
            recipe.plugin(kind)  # validates the plugin's own options now, not mid-run
        except PluginError as exc:
            raise ConfigError(f"{where}: {kind[:-1]}: {exc}") from None
    for name, bench in recipe.eval.benchmarks.items():
        if bench.verifier is not None:
            try:
                load_plugin("verifiers", bench.verifier.name, bench.verifier.options)
            except PluginError as exc:
                raise ConfigError(f"{where}: eval.benchmarks.{name}.verifier: {exc}") from None
    return recipe


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A recipe mapping → dotted keys (`optim.lr`), as overrides spell them."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):  # an empty one adds no key: {} and a missing section are alike
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def dump_recipe(recipe: Recipe) -> dict[str, Any]:
    return recipe.model_dump(mode="json")


def resolved_recipe(recipe: Recipe) -> dict[str, Any]:
    """The recipe with every default, and each selected plugin's options with its defaults too."""
    data = dump_recipe(recipe)
    for kind in ("objectives", "verifiers", "samplers"):
        plugin = recipe.plugin(kind)
        if isinstance(plugin, BaseModel):
            data[kind[:-1]]["options"] = plugin.model_dump(mode="json")
    return data
