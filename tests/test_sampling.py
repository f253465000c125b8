"""Plugins are made once per stage and shared: one sampler serves a run's rounds and its
evaluations, one generate() at a time."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from minpro_cli.config import load_recipe
from minpro_cli.distributed import SINGLE
from minpro_cli.modeling import load_policy
from minpro_cli.samplers import Generation
from minpro_cli.sampling import PROMPTS_PER_CHUNK, Plugins, sample_rows, sampling_job
from minpro_cli.tasks import Problem
from minpro_cli.train import Trainer

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


def test_the_trainer_resolves_its_plugins_once_and_shares_the_sampler(tmp_path, monkeypatch):
    made: list[str] = []
    real = Plugins.of.__func__

    def counting(cls, recipe):
        made.append(recipe.sampler.name)
        return real(cls, recipe)

    monkeypatch.setattr(Plugins, "of", classmethod(counting))
    recipe = load_recipe(QUICKSTART, [f"run_dir={tmp_path}", "train.iterations=1", "train.prompts_per_iteration=2"])
    trainer = Trainer(recipe, SINGLE)
    assert made == ["hf"]
    assert trainer.source.job.sampler is trainer.held_out.plugins.sampler is trainer.plugins.sampler
    assert trainer.objective is trainer.plugins.objective


class SlowSampler:
    """Records how many generate() calls run at once."""

    temperature, top_p, top_k = 1.0, 1.0, 0

    def __init__(self) -> None:
        self.running = self.most = 0

    def generate(self, policy, prompts, seed):
        self.running += 1
        self.most = max(self.most, self.running)
        time.sleep(0.5)  # long enough for the other thread to arrive
        self.running -= 1
        return [Generation([5], [-0.1], "stop") for _ in prompts]


def test_jobs_of_one_plugins_never_generate_at_the_same_time(tmp_path):
    recipe = load_recipe(QUICKSTART, [f"run_dir={tmp_path}"])
    plugins = Plugins.of(recipe)
    sampler = SlowSampler()
    object.__setattr__(plugins, "sampler", sampler)
    policy = load_policy("embedded")
    jobs = [sampling_job(recipe, policy, plugins), sampling_job(recipe, policy.copy(), plugins)]
    problems = [Problem(id=f"p{i}", question="Compute 1+1.", answer="2") for i in range(3)]
    threads = [threading.Thread(target=sample_rows, args=(job, problems, 2, i)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sampler.most == 1
    unlocked = sampling_job(recipe, policy, plugins)
    unlocked.sampler_lock = threading.Lock()  # a job with its own lock would overlap: the test can fail
    threads = [threading.Thread(target=sample_rows, args=(job, problems, 2, 0)) for job in (jobs[0], unlocked)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sampler.most == 2


class CountingSampler:
    """Records each generate() call's prompt count and seed; no `prompts_per_call` (as `hf`)."""

    temperature, top_p, top_k = 1.0, 1.0, 0

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def generate(self, policy, prompts, seed):
        self.calls.append((len(prompts), seed))
        return [Generation([5], [-0.1], "stop") for _ in prompts]


class WholeRoundSampler(CountingSampler):
    prompts_per_call = None  # as the vllm sampler: the engine schedules its own batches


class FourPromptSampler(CountingSampler):
    prompts_per_call = 4


def test_a_sampler_says_how_many_prompts_go_in_one_call(tmp_path):
    recipe = load_recipe(QUICKSTART, [f"run_dir={tmp_path}"])
    plugins = Plugins.of(recipe)
    problems = [Problem(id=f"p{i}", question="Compute 1+1.", answer="2") for i in range(PROMPTS_PER_CHUNK + 6)]
    calls = {}
    for kind in (CountingSampler, WholeRoundSampler, FourPromptSampler):
        object.__setattr__(plugins, "sampler", kind())
        rows, _ = sample_rows(sampling_job(recipe, load_policy("embedded"), plugins), problems, 2, seed=3)
        assert len(rows) == 2 * len(problems)
        calls[kind] = plugins.sampler.calls
    assert [n for n, _ in calls[CountingSampler]] == [2 * PROMPTS_PER_CHUNK, 12]  # chunks, for progress
    assert calls[WholeRoundSampler] == [(2 * len(problems), 3 * 1_000_003)]  # one call, the first chunk's seed
    assert [n for n, _ in calls[FourPromptSampler]] == [8] * 17 + [4]
