"""Plugin outputs are checked where they enter minpro: a sampler, verifier or objective that
misbehaves is one error naming the plugin and what is wrong (and the row), never wrong ratios,
missing rows or a traceback; a verifier that hangs is bounded on every call, the first too."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from minpro_cli import verifiers
from minpro_cli.config import load_recipe
from minpro_cli.errors import PluginError, TrainingDivergedError
from minpro_cli.modeling import load_policy
from minpro_cli.objectives import ObjectiveInputs, ObjectiveOutput
from minpro_cli.samplers import Generation
from minpro_cli.sampling import SamplingJob, sample_rows
from minpro_cli.step import RolloutBatch, Trainee, check_loss, update_step
from minpro_cli.tasks import Problem
from minpro_cli.train import run_train
from minpro_cli.verifiers import VerifierCallError, VerifyResult, verify_batch
from minpro_cli.verifiers.exact import ExactVerifier

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
PROBLEMS = [Problem(id=f"p{i}", question=f"{i}+1", answer=str(i + 1)) for i in range(4)]


@pytest.fixture(scope="module")
def policy():
    return load_policy("embedded")


@dataclass
class FakeSampler:
    """Returns what `shape` makes of a well-formed generation per prompt."""

    shape: Callable[[list[Generation]], list[Generation]]
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def generate(self, policy, prompts, seed):
        return self.shape([Generation([5, 6, 2], [-0.5, -1.0, -0.1], "stop") for _ in prompts])


def job(policy, sampler=None, verifier=None) -> SamplingJob:
    return SamplingJob(policy, sampler or FakeSampler(lambda g: g), "fake", verifier or ExactVerifier(), "checker",
                       "{question}\n")  # fmt: skip


def one_fewer_logprob(gens):
    return [Generation(g.token_ids, g.logprobs[:-1], g.finish_reason) for g in gens]


SAMPLER_FAULTS = [
    (one_fewer_logprob, "3 tokens but 2 log-probs"),
    (lambda gens: gens[:-1], "returned 7 generations for 8 prompts"),
    (lambda gens: [Generation(g.token_ids, [-0.5, math.nan, -0.1], "stop") for g in gens], "log-prob nan"),
    (lambda gens: [Generation(g.token_ids, [-0.5, 0.3, -0.1], "stop") for g in gens], "log-prob 0.3"),
    (lambda gens: [Generation(g.token_ids, [-0.5, -math.inf, -0.1], "stop") for g in gens], "log-prob -inf"),
    (lambda gens: [Generation([5, 10**6, 2], g.logprobs, "stop") for g in gens], "token id 1000000"),
    (lambda gens: [Generation([], [], "stop") for g in gens], "no tokens"),
]


@pytest.mark.parametrize(("shape", "says"), SAMPLER_FAULTS, ids=[s for _, s in SAMPLER_FAULTS])
def test_a_misbehaving_sampler_is_an_error_naming_it(policy, shape, says):
    with pytest.raises(PluginError, match="sampler 'fake'") as raised:
        sample_rows(job(policy, FakeSampler(shape)), PROBLEMS, 2, seed=0)
    assert says in str(raised.value) and "fix it" in str(raised.value)


@dataclass(frozen=True)
class Returns:
    """A verifier that returns `value` as the reward of the second response it sees."""

    value: object

    def __call__(self, response, reference):
        return VerifyResult(self.value if response.startswith("") and reference == "2" else 0.0)


@dataclass(frozen=True)
class Raises:
    def __call__(self, response, reference):
        if reference == "3":
            raise KeyError("oops")
        return VerifyResult(0.0)


VERIFIER_FAULTS = [
    (Returns(math.nan), "problem 'p1', sample 0: reward nan is not a finite number"),
    (Returns(math.inf), "reward inf"),
    (Returns("1"), "reward '1'"),
    (Returns(None), "reward None"),
    (Raises(), "problem 'p2', sample 0: raised KeyError"),
]


@pytest.mark.parametrize(("verifier", "says"), VERIFIER_FAULTS, ids=[s for _, s in VERIFIER_FAULTS])
def test_a_misbehaving_verifier_is_an_error_naming_it_and_the_row(policy, verifier, says):
    with pytest.raises(PluginError, match="verifier 'checker'") as raised:
        sample_rows(job(policy, verifier=verifier), PROBLEMS, 2, seed=0)
    assert says in str(raised.value)


class Sleeper:
    """A plugin verifier (not bounded in process) whose first call hangs."""

    timeout_s = 0.5

    def __call__(self, response: str, reference: str) -> VerifyResult:
        if response == "hang":
            time.sleep(3600)
        return VerifyResult(1.0)


def test_a_verifier_that_hangs_on_the_first_call_is_bounded():
    started = time.perf_counter()
    results = verify_batch(Sleeper(), ["hang", "ok", "ok"], ["1", "1", "1"], workers=2)
    took = time.perf_counter() - started
    assert [r.reward for r in results] == [0.0, 1.0, 1.0]
    assert "timed out" in results[0].details["failure"]
    assert took < 30, f"took {took:.0f} s"  # the bound is 2·0.5 + 5 s, plus starting the workers


class NonScalar:
    def __call__(self, inputs: ObjectiveInputs) -> ObjectiveOutput:
        return ObjectiveOutput(loss=-(inputs.logprobs * inputs.advantages[:, None]).sum(dim=1), metrics={})


def test_an_objective_returning_a_non_scalar_loss_is_an_error_naming_it(policy):
    batch = RolloutBatch(prompts=[[5, 6]], responses=[[7, 2]], behavior_logprobs=[[-1.0, -1.0]],
                         advantages=torch.tensor([1.0]), temperature=1.0)  # fmt: skip
    optimizer = torch.optim.SGD(policy.model.parameters(), lr=0.0)
    with pytest.raises(PluginError, match="objective 'NonScalar' returned a loss of shape \\[1\\]"):
        update_step(Trainee(policy.model, policy.pad_token_id), optimizer, NonScalar(), batch, 1.0)
    with pytest.raises(PluginError, match="without a gradient"):
        check_loss(NonScalar(), torch.tensor(0.0))
    check_loss(NonScalar(), torch.tensor(0.0, requires_grad=True))  # a scalar with a gradient passes


class Poisoning(torch.optim.SGD):
    """An optimizer whose step leaves an infinite weight (what an overflowing update does)."""

    def step(self, closure=None):
        super().step(closure)
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = math.inf


def test_a_step_that_makes_non_finite_weights_stops_the_run_and_publishes_nothing(tmp_path, monkeypatch):
    """The loss and the gradient were finite; the weights after the step are not: the run stops
    with diverged.json, and neither a checkpoint nor final/ holds those weights."""
    from minpro_cli.sections import OptimConfig

    monkeypatch.setattr(OptimConfig, "build", lambda self, params: Poisoning(params, lr=self.lr))
    recipe = load_recipe(QUICKSTART, [f"run_dir={tmp_path}", "optim.warmup_steps=0", "train.iterations=2",
                                      "train.prompts_per_iteration=8", "train.group_size=4",
                                      "train.checkpoint_every=1", "sampler.options.max_new_tokens=16"])  # fmt: skip
    with pytest.raises(TrainingDivergedError, match="the optimizer step made non-finite weights"):
        run_train(recipe)
    assert "non-finite weights" in (tmp_path / "diverged.json").read_text()
    assert not (tmp_path / "final").exists() and not (tmp_path / "checkpoints").exists()


SLOW_IMPORT = """
import time
from minpro_cli.verifiers import VerifyResult
time.sleep(8)  # importing this module, in a freshly spawned worker, outlasts one call's bound


class SlowToImport:
    timeout_s = 0.5  # bound: 2 · 0.5 + 5 = 6 s

    def __call__(self, response, reference):
        return VerifyResult(1.0)
"""


def test_a_worker_that_starts_slowly_does_not_cost_the_first_batch_its_rewards(tmp_path, monkeypatch):
    """The pool's workers start and import the verifier's module before any call is timed."""
    (tmp_path / "slow_verifier_module.py").write_text(SLOW_IMPORT)
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers get the parent's sys.path…
    verifiers._discard_pool()  # …when they start: a pool an earlier test left would not have it
    from slow_verifier_module import SlowToImport

    results = verify_batch(SlowToImport(), ["a", "b", "c"], ["1", "1", "1"], workers=2)
    assert [r.reward for r in results] == [1.0, 1.0, 1.0], [r.details for r in results]


class Unpicklable:
    timeout_s = 1.0

    def __init__(self) -> None:
        self.lock = threading.Lock()  # a verifier holding what cannot cross to a worker

    def __call__(self, response: str, reference: str) -> VerifyResult:
        return VerifyResult(1.0)


def test_a_verifier_that_cannot_reach_its_workers_is_an_error_naming_why():
    with pytest.raises(VerifierCallError, match="cannot pickle '_thread.lock'") as raised:
        verify_batch(Unpicklable(), ["a", "b", "c"], ["1", "1", "1"], workers=2)
    assert raised.value.index == 0
