"""The command line: bad input gives one line naming the culprit and exit code 2."""

from __future__ import annotations

import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from minpro_cli.cli import app
from minpro_cli.registry import discover, load_objective

QUICKSTART = str(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml")
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    error_lines = [line for line in lines if line.startswith("error:")]
    assert len(error_lines) == 1, result.output
    joined = " ".join(lines)
    for fragment in fragments:
        assert fragment in joined, (fragment, result.output)


def test_unknown_config_key(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("train:\n  iteratons: 3\n")
    assert_one_line_error(invoke("train", str(recipe)), "bad.yaml", "train.iteratons")


def test_wrong_type_in_override():
    assert_one_line_error(invoke("rollout", QUICKSTART, "rollout.group_size=lots"), "rollout.group_size", "lots")


def test_missing_rollout_file(tmp_path):
    assert_one_line_error(
        invoke("inspect-ratios", str(tmp_path / "none.parquet"), "--policy", "embedded"), "none.parquet"
    )


def test_foreign_parquet_in_training(tmp_path):
    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"a": [1]}), foreign)
    result = invoke("train", QUICKSTART, f"run_dir={tmp_path / 'run'}", f"train.rollouts={foreign}")
    assert_one_line_error(result, "foreign.parquet", "not written by minpro")


def test_missing_checkpoint(tmp_path):
    result = invoke("eval", QUICKSTART, f"run_dir={tmp_path}", "--policy", str(tmp_path / "no-such-ckpt"))
    assert_one_line_error(result, "no-such-ckpt", "checkpoint not found")


def test_pickle_only_checkpoint_is_refused(tmp_path):
    ckpt = tmp_path / "pickled"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "pytorch_model.bin").write_bytes(b"not loaded")
    assert_one_line_error(invoke("eval", QUICKSTART, f"run_dir={tmp_path}", "--policy", str(ckpt)), "safetensors only")


def test_plugins_lists_builtins_with_their_package():
    result = invoke("plugins")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    for name in ("minpro", "grpo", "gspo", "m2po", "math", "hf"):
        (row,) = [line for line in lines if line.startswith(f"│ {name} ")]
        assert "│ minpro " in row and " ok " in row  # provided by our own package, loads
    assert "MinPRO:" in result.output  # each plugin is summarised by its docstring


def fake_distribution(root: Path, name: str, entry_points: str, module: str, source: str) -> None:
    dist = root / f"{name}-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(entry_points)
    (root / f"{module}.py").write_text(source)


@pytest.fixture
def broken_and_duplicate_plugins(tmp_path, monkeypatch):
    fake_distribution(
        tmp_path, "broken-plugin", "[minpro.objectives]\nexploding = broken_mod:Thing\n",
        "broken_mod", "raise RuntimeError('kaboom at import')\n",
    )
    fake_distribution(
        tmp_path, "squatter-plugin", "[minpro.objectives]\nminpro = squat_mod:Squat\n",
        "squat_mod", "from pydantic import BaseModel\nclass Squat(BaseModel):\n    pass\n",
    )
    fake_distribution(
        tmp_path, "bare-plugin", "[minpro.objectives]\nbare = bare_mod:Bare\n",
        "bare_mod", "from pydantic import BaseModel\nclass Bare(BaseModel):\n    pass\n",
    )
    monkeypatch.syspath_prepend(str(tmp_path))


def test_plugins_show_prints_the_formula_and_every_option_with_its_default():
    result = runner.invoke(app, ["plugins", "show", "minpro"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "w_t  = ρ̲_t · ρ_t" in result.output  # the docstring's formula
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") == 5}
    assert set(rows) >= {"eps_low", "eps_high", "clip_mode", "loss_agg", "prefix_cap_at_one"}
    assert "0.2" in rows["eps_high"] and "'cispo'" in rows["clip_mode"]
    sampler = runner.invoke(app, ["plugins", "show", "hf"], env={"COLUMNS": "200"})
    assert "sampler.options.KEY" in sampler.output and "max_new_tokens" in sampler.output
    missing = runner.invoke(app, ["plugins", "show", "nosuch"])
    assert missing.exit_code == 2 and "no installed plugin named 'nosuch'" in missing.output


def test_objective_plugin_must_build_on_the_objective_base(broken_and_duplicate_plugins):
    result = invoke("train", QUICKSTART, "objective.name=bare")
    assert_one_line_error(result, "bare", "bare-plugin", "must subclass minpro_cli.objectives.Objective")


def test_broken_plugin_is_named_and_others_keep_working(broken_and_duplicate_plugins):
    result = invoke("plugins")
    assert result.exit_code == 0
    assert "broken-plugin" in result.output and "kaboom at import" in result.output
    assert any(line.startswith("│ math ") and " ok " in line for line in result.output.splitlines())
    result = invoke("train", QUICKSTART, "objective.name=exploding")
    assert_one_line_error(result, "exploding", "broken-plugin", "failed to import")


def test_duplicate_name_never_replaces_a_builtin(broken_and_duplicate_plugins):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        entries = discover("objectives")
    assert entries["minpro"].package == "minpro"
    assert any("squatter-plugin" in str(w.message) for w in caught)
    assert type(load_objective("minpro")).__name__ == "MinPRO"


def test_eval_compare_needs_no_recipe(tmp_path):
    for name, value in (("a", 0.25), ("b", 0.5)):
        (tmp_path / f"{name}.json").write_text(f'{{"pass@1": {value}}}')
    result = invoke("eval", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    assert result.exit_code == 0 and "+0.25" in result.output
    assert_one_line_error(invoke("eval"), "give a recipe to evaluate, or --compare")


def test_version_and_the_resolved_recipe_which_loads_back(tmp_path):
    from importlib.metadata import version

    from minpro_cli.config import load_recipe, resolved_recipe

    assert invoke("--version").stdout == f"minpro {version('minpro')}\n"
    result = invoke("config", QUICKSTART, "objective.name=grpo", "objective.options={}", "optim.lr=3e-5")
    assert result.exit_code == 0, result.output
    (tmp_path / "resolved.yaml").write_text(result.stdout)
    printed = yaml.safe_load(result.stdout)
    assert printed["optim"]["lr"] == 3e-5 and printed["train"]["micro_batch_tokens"] == 16384  # a default
    assert printed["objective"]["options"]["eps_high"] == 0.2  # grpo's own default, filled in
    assert printed["sampler"]["options"]["max_new_tokens"] == 48
    again = load_recipe(tmp_path / "resolved.yaml")
    assert resolved_recipe(again) == printed  # the printed recipe is the same recipe


def test_a_misspelt_key_suggests_the_known_one():
    assert_one_line_error(invoke("train", QUICKSTART, "optim.warmup_step=3"), "unknown key 'optim.warmup_step'",
                          "did you mean 'optim.warmup_steps'?")
    assert_one_line_error(invoke("train", QUICKSTART, "objective.options.eps_hgh=0.3"), "did you mean 'eps_high'?")
    result = invoke("train", QUICKSTART, "optim.zzzz=3")
    assert "unknown key 'optim.zzzz'" in result.output and "did you mean" not in result.output


def test_eval_result_to_stdout(tmp_path):
    import json

    result = invoke("eval", QUICKSTART, f"run_dir={tmp_path}", "eval.max_problems=3", "eval.n_samples=2",
                    "eval.k=[1,2]", "sampler.options.max_new_tokens=16", "--output", "-")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)  # the tables went to stderr
    written = json.loads((tmp_path / "eval" / "embedded.json").read_text())
    assert printed["n_problems"] == 3 and printed["pass@1"] == written["pass@1"]


def test_progress_is_one_line_per_change_when_the_output_is_not_a_terminal(capsys):
    from minpro_cli.console import progress_bar

    with progress_bar("rounds", total=3) as bar:
        bar.set(0, "starting")  # nothing done yet: nothing to say
        bar.advance(1, "reward 0.1")
        bar.set(1, "reward 0.1")  # a poller repeating the state prints nothing new
        bar.advance(2, "reward 0.3")
    assert capsys.readouterr().err.splitlines() == ["rounds 1/3 reward 0.1", "rounds 3/3 reward 0.3"]
