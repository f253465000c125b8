"""Plugin tooling: conformance checks on every built-in (and on broken objectives, which they
must catch), the packages under plugins/ installed as a user would, and `minpro plugins new`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minpro_cli.conformance import check_plugin, objective_checks
from minpro_cli.errors import ConfigError
from minpro_cli.objectives import Objective, ObjectiveInputs, ObjectiveOutput
from minpro_cli.registry import KINDS, discover
from minpro_cli.scaffold import new_plugin

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "plugins" / "minpro-example-plugins"
# package → the minpro plugins it registers (minpro-verl registers with verl, not minpro)
PACKAGES = {
    "minpro-example-plugins": ("spo", "regex"),
    "minpro-openai": ("openai",),
    "minpro-vllm": ("vllm",),
    "minpro-verl": (),
}
OPT_IN = {"minpro-vllm", "minpro-verl"}  # their own tests need a vllm / verl environment, else they skip
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


# built-ins that cannot run on their defaults: the options they are checked with
OPTIONS = {("verifiers", "python"): {"path": str(ROOT / "recipes" / "rewards" / "trl_rewards.py"),
                                     "function": "accuracy_reward"}}  # fmt: skip


@pytest.mark.parametrize("kind,name", [(k, n) for k in KINDS for n in sorted(discover(k))])
def test_every_builtin_passes_the_conformance_checks(kind, name, policy):
    results = check_plugin(kind, name, OPTIONS.get((kind, name), {}), lambda: policy)
    assert all(r.passed for r in results), [r for r in results if not r.passed]


class WidthNormalised(Objective):
    def __call__(self, inputs: ObjectiveInputs) -> ObjectiveOutput:
        per_token = -inputs.token_advantages() * inputs.logprobs * inputs.response_mask
        return ObjectiveOutput(per_token.mean(), {})  # divides by B·T: padding changes the loss


class LeaksIntoPadding(Objective):
    def __call__(self, inputs: ObjectiveInputs) -> ObjectiveOutput:
        return ObjectiveOutput(-(inputs.token_advantages() * inputs.logprobs).mean(), {})


class WrongSign(Objective):
    def __call__(self, inputs: ObjectiveInputs) -> ObjectiveOutput:
        per_token = inputs.token_advantages() * inputs.logprobs
        # a metric still attached to the graph: every step would keep its graph alive
        return ObjectiveOutput(self.aggregate(per_token, inputs.response_mask), {"n": inputs.logprobs.sum()})


class OwnMean(Objective):
    """Padding-invariant, yet its mean is over whatever rows it is given, not the minibatch's."""

    def __call__(self, inputs: ObjectiveInputs) -> ObjectiveOutput:
        mask = inputs.response_mask
        per_token = -inputs.token_advantages() * inputs.logprobs
        return ObjectiveOutput(torch.where(mask, per_token, 0.0).sum() / mask.sum(), {})


@pytest.mark.parametrize(
    "objective,failing",
    [
        (OwnMean(), {"invariant to splitting the minibatch"}),
        (WidthNormalised(), {"invariant to padding length", "invariant to splitting the minibatch"}),
        (LeaksIntoPadding(), {"gradient only on response tokens", "invariant to padding length",
                              "invariant to splitting the minibatch"}),
        (WrongSign(), {"on-policy gradient follows −A", "metrics are scalars"}),
    ],
)
def test_conformance_catches_broken_objectives(objective, failing):
    failed = {r.name for r in objective_checks(objective) if not r.passed}
    assert failed == failing


def run(*args: str, path: Path, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(path), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
                          check=False)


def install(package: Path, target: Path) -> Path:
    """pip install into a throwaway directory (no index, no build isolation): nothing leaks into the venv."""
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(package)], check=True, timeout=300)
    return target


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> Path:
    return install(EXAMPLES, tmp_path_factory.mktemp("site"))


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_plugin_package_is_listed_and_its_own_tests_pass(package, tmp_path):
    source = ROOT / "plugins" / package
    site = install(source, tmp_path / "site")
    listed = run("-m", "minpro_cli.cli", "plugins", path=site)
    assert listed.returncode == 0, listed.stderr
    rows = (listed.stdout + listed.stderr).splitlines()
    for name in PACKAGES[package]:
        assert any(r.startswith(f"│ {name} ") and package in r and " ok " in r for r in rows), (name, rows)
    result = run("-m", "pytest", "-q", "-p", "no:cacheprovider", str(source / "tests"), path=site, cwd=source)
    assert result.returncode == 0 and "failed" not in result.stdout, result.stdout[-3000:]
    assert " passed" in result.stdout or (package in OPT_IN and " skipped" in result.stdout), result.stdout


def test_example_plugins_pass_the_conformance_checks(examples):
    from minpro_cli.objectives import Objective, ObjectiveOptions

    # the example package subclasses the objective base by its old name, which stays an alias
    assert ObjectiveOptions is Objective
    assert "ObjectiveOptions" in (ROOT / "plugins/minpro-example-plugins/src/minpro_examples/spo.py").read_text()
    for name in PACKAGES["minpro-example-plugins"]:
        checked = run("-m", "minpro_cli.cli", "plugins", "check", name, path=examples)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert "FAIL" not in checked.stdout + checked.stderr


def test_train_runs_a_recipe_naming_the_example_objective(examples, tmp_path):
    result = run("-m", "minpro_cli.cli", "train", str(QUICKSTART), f"run_dir={tmp_path}", "objective.name=spo",
                 "objective.options={epsilon: 0.1}", "rollout.num_prompts=4", "train.prompts_per_iteration=4",
                 "train.group_size=4", "train.iterations=1", "sampler.options.max_new_tokens=32", path=examples)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    metrics = (tmp_path / "metrics.jsonl").read_text()
    assert '"beyond_epsilon_frac"' in metrics and (tmp_path / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("kind", ["objective", "verifier", "sampler"])
def test_scaffold_installs_and_its_generated_test_passes(kind, tmp_path):
    package = new_plugin(kind, f"my_{kind}", tmp_path)
    site = install(package, tmp_path / "site")
    tests = run("-m", "pytest", "-q", "-p", "no:cacheprovider", str(package / "tests"), path=site, cwd=package)
    assert tests.returncode == 0 and "3 passed" in tests.stdout, tests.stdout[-2000:]
    listed = run("-m", "minpro_cli.cli", "plugins", path=site)
    rows = (listed.stdout + listed.stderr).splitlines()
    assert any(r.startswith(f"│ my_{kind} ") and f"minpro-my-{kind}" in r for r in rows), rows
    if kind == "objective":  # the unwritten stub does not pass the checks, and says why
        checked = run("-m", "minpro_cli.cli", "plugins", "check", f"my_{kind}", path=site)
        assert checked.returncode == 1 and "NotImplementedError" in checked.stdout + checked.stderr


def test_scaffold_refuses_bad_names_and_existing_directories(tmp_path):
    with pytest.raises(ConfigError, match="lowercase Python identifier"):
        new_plugin("objective", "My-Objective", tmp_path)
    with pytest.raises(ConfigError, match="kind must be one of"):
        new_plugin("reward", "mine", tmp_path)
    new_plugin("verifier", "mine", tmp_path)
    with pytest.raises(ConfigError, match="already exists"):
        new_plugin("verifier", "mine", tmp_path)
