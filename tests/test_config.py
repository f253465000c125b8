"""Recipes: validation errors name the key and the file; overrides are typed."""

from __future__ import annotations

from pathlib import Path

import pytest

from minpro_cli.config import load_recipe, parse_override
from minpro_cli.errors import ConfigError

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_quickstart_recipe_loads_and_overrides_apply():
    recipe = load_recipe(QUICKSTART, ["optim.lr=3e-5", "train.staleness=4", "objective.options.eps_high=0.28"])
    assert recipe.optim.lr == 3e-5
    assert recipe.train.staleness == 4
    assert recipe.objective.options["eps_high"] == 0.28
    assert recipe.plugin("objectives").eps_high == 0.28


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml.*unknown key 'optim.learning_rate'"):
        load_recipe(path)


def test_wrong_type_names_key_and_value(tmp_path):
    path = write(tmp_path, "train:\n  iterations: many\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml.*'train.iterations'.*'many'"):
        load_recipe(path)


def test_bad_override_is_attributed_to_the_command_line():
    with pytest.raises(ConfigError, match=r"overrides optim.lr.*'optim.lr'"):
        load_recipe(QUICKSTART, ["optim.lr=-1"])
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        load_recipe(QUICKSTART, ["optim.lr"])


def test_plugin_options_are_validated_at_load_time(tmp_path):
    path = write(tmp_path, "objective:\n  name: minpro\n  options:\n    eps_hgh: 0.3\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml.*objective.*eps_hgh"):
        load_recipe(path)
    path = write(tmp_path, "sampler:\n  name: vllm-turbo\n")
    with pytest.raises(ConfigError, match="unknown sampler 'vllm-turbo'"):
        load_recipe(path)


def test_missing_and_malformed_recipe_files(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found"):
        load_recipe(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_recipe(write(tmp_path, "- 1\n- 2\n"))


def test_eval_k_must_not_exceed_samples(tmp_path):
    with pytest.raises(ConfigError, match="n_samples=2"):
        load_recipe(write(tmp_path, "eval:\n  n_samples: 2\n  k: [1, 4]\n"))


@pytest.mark.parametrize(
    "text,expected",
    [("a.b=3", 3), ("a.b=3e-5", 3e-5), ("a.b=true", True), ("a.b=[1, 2]", [1, 2]), ("a.b=hello", "hello")],
)
def test_override_values_are_parsed_as_yaml(text, expected):
    assert parse_override(text) == ("a.b", expected)


def test_every_shipped_recipe_validates():
    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
    assert len(recipes) >= 2
    for path in recipes:
        load_recipe(path)  # raises ConfigError naming the key if a recipe drifts from the models
    suite = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "math-suite.yaml")
    assert set(suite.eval.benchmarks) == {"aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench", "gsm8k"}
    assert suite.eval.benchmarks["gsm8k"].verifier.name == "gsm8k"


def test_benchmark_names_must_be_safe_file_names():
    with pytest.raises(ConfigError, match="benchmark names become file names"):
        load_recipe(None, ['eval.benchmarks={"../escape": {data: "embedded:arith-test"}}'])


def test_yaml_anchors_work_but_alias_bombs_recursion_and_deep_nesting_are_refused(tmp_path):
    shared = write(tmp_path, "optim: &o\n  lr: 0.002\nsweep:\n  grid:\n    optim.lr: [0.001, 0.002]\n    x: [*o]\n")
    assert load_recipe(shared).sweep.grid["x"] == [{"lr": 0.002}]  # aliases within the bound expand as usual
    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"{n}: &{n} [" + ", ".join([f"*{p}"] * 10) + "]" for p, n in zip("abcdefgh", "bcdefghi")]
    bomb = write(tmp_path, "".join(line + "\n" for line in levels))  # expands to 10^9 scalars
    with pytest.raises(ConfigError, match=r"recipe.yaml: not valid YAML \(aliases expand it to more than 100000"):
        load_recipe(bomb)
    with pytest.raises(ConfigError, match="refers to a node that contains it"):
        load_recipe(write(tmp_path, "a: &a [1, *a]\n"))
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_recipe(write(tmp_path, "a: " + "[" * 20_000 + "]" * 20_000 + "\n"))


def test_optimizer_settings_reach_the_optimizer():
    import torch

    params = [torch.nn.Parameter(torch.zeros(2))]
    adamw = load_recipe(None, ["optim.eps=1e-3", "optim.betas=[0.8,0.9]"]).optim.build(params)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["eps"] == 1e-3
    assert adamw.param_groups[0]["betas"] == (0.8, 0.9)
    sgd = load_recipe(None, ["optim.name=sgd", "optim.momentum=0.5"]).optim.build(params)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.5
    with pytest.raises(ConfigError, match="optim.momentum is SGD's"):
        load_recipe(None, ["optim.momentum=0.9"])
