"""Sampling, as every stage does it: problems × group size → responses → rewards → rollout rows
(`RolloutRow`s, which `rollouts.py` writes), with the recipe's sampler, verifier and prompt
template. `Plugins` resolves a recipe's plugins once; a stage passes it down."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import torch

from minpro_cli.advantages import group_indices, zero_variance_groups
from minpro_cli.config import Recipe
from minpro_cli.console import progress_bar
from minpro_cli.errors import ConfigError
from minpro_cli.modeling import Policy, load_policy, model_fingerprint, tokenizer_fingerprint
from minpro_cli.objectives import Objective
from minpro_cli.registry import load_plugin
from minpro_cli.rollouts import RolloutRow
from minpro_cli.samplers import Sampler
from minpro_cli.tasks import Problem, load_problems, render_prompt
from minpro_cli.verifiers import Verifier, verify_batch

PROMPTS_PER_CHUNK = 64  # progress granularity; each chunk gets its own derived seed


@dataclass(frozen=True)
class Plugins:
    """A recipe's objective, sampler and verifiers, made once per stage and passed down: the
    training rounds and the held-out evaluations share one sampler (one vLLM engine, say)."""

    objective: Objective
    sampler: Sampler
    verifier: Verifier
    benchmark_verifiers: dict[str, Verifier]  # eval.benchmarks.NAME.verifier, where one is set
    # one generate() at a time on the shared sampler: the pipeline's thread and evaluations
    sampler_lock: threading.Lock = field(default_factory=threading.Lock, compare=False)

    @classmethod
    def of(cls, recipe: Recipe) -> Plugins:
        return cls(
            objective=recipe.plugin("objectives"),
            sampler=recipe.plugin("samplers"),
            verifier=recipe.plugin("verifiers"),
            benchmark_verifiers={
                name: load_plugin("verifiers", bench.verifier.name, bench.verifier.options)
                for name, bench in recipe.eval.benchmarks.items()
                if bench.verifier is not None
            },
        )

    @property
    def generation_budget(self) -> int | None:
        """The sampler's max_new_tokens: Dr.GRPO's constant L when the objective pins none."""
        length = getattr(self.sampler, "max_new_tokens", None)  # any sampler that declares one
        return length if isinstance(length, int) else None


@dataclass
class SamplingJob:
    """Everything needed to sample and score one rollout batch, whatever stage asks."""

    policy: Policy
    sampler: Sampler
    sampler_name: str
    verifier: Verifier
    verifier_name: str
    prompt_template: str
    policy_version: int = 0
    chat: bool = False  # wrap the prompt in the tokenizer's chat template
    system_prompt: str | None = None
    sampler_lock: threading.Lock = field(default_factory=threading.Lock)  # shared with the sampler's other jobs

    def prompt(self, problem: Problem) -> str:
        """Text prompts get the template (and the chat template when `chat`); chat prompts are
        rendered with the chat template as given, the system prompt added when they have none."""
        if problem.messages is None and not self.chat:
            return render_prompt(self.prompt_template, problem)
        messages = problem.messages or [{"role": "user", "content": render_prompt(self.prompt_template, problem)}]
        if self.system_prompt and all(m["role"] != "system" for m in messages):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        if not getattr(self.policy.tokenizer, "chat_template", None):
            raise ConfigError(
                f"problem '{problem.id}' is a list of chat messages, but the tokenizer of {self.policy.path} has no "
                "chat template to render them: use a model with one, or a dataset whose prompts are text"
            )
        return str(self.policy.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


def sample_rows(
    job: SamplingJob, problems: list[Problem], group_size: int, seed: int, label: str = "sampling"
) -> tuple[list[RolloutRow], float]:
    """Rows for `group_size` responses per problem, and tokens/s."""
    tok = job.policy.tokenizer
    fingerprints = (model_fingerprint(job.policy.model), tokenizer_fingerprint(tok))
    prompts = [job.prompt(p) for p in problems]
    prompt_ids = [tok.encode(text, add_special_tokens=False) for text in prompts]
    rows: list[RolloutRow] = []
    n_tokens, started = 0, time.perf_counter()
    with progress_bar(label, total=len(problems) * group_size) as bar:
        for chunk_index, start in enumerate(range(0, len(problems), PROMPTS_PER_CHUNK)):
            chunk = list(range(start, min(start + PROMPTS_PER_CHUNK, len(problems))))
            chunk_seed = seed * 1_000_003 + chunk_index
            expanded = [prompt_ids[i] for i in chunk for _ in range(group_size)]
            with job.sampler_lock, job.policy.autocast():  # μ is computed at the precision π_θ trains at
                generations = job.sampler.generate(job.policy, expanded, seed=chunk_seed)
            responses = [tok.decode(gen.token_ids, skip_special_tokens=True) for gen in generations]
            answers = [problems[chunk[offset // group_size]].answer for offset in range(len(generations))]
            results = verify_batch(job.verifier, responses, answers)
            for offset, (gen, response, result) in enumerate(zip(generations, responses, results)):
                problem = problems[chunk[offset // group_size]]
                n_tokens += len(gen.token_ids)
                rows.append(
                    RolloutRow(
                        prompt_id=problem.id,
                        sample_index=offset % group_size,
                        prompt=prompts[chunk[offset // group_size]],
                        response=response,
                        prompt_token_ids=expanded[offset],
                        response_token_ids=gen.token_ids,
                        behavior_logprobs=gen.logprobs,
                        reference_answer=problem.answer,
                        reward=result.reward,
                        verifier=job.verifier_name,
                        verifier_details=json.dumps(result.details),
                        finish_reason=gen.finish_reason,
                        policy_version=job.policy_version,
                        model_fingerprint=fingerprints[0],
                        tokenizer_fingerprint=fingerprints[1],
                        sampler=job.sampler_name,
                        temperature=job.sampler.temperature,
                        top_p=job.sampler.top_p,
                        top_k=job.sampler.top_k,
                        seed=chunk_seed,
                    )
                )
            bar.advance(len(generations))
    return rows, n_tokens / max(time.perf_counter() - started, 1e-9)


def summarize_rows(rows: list[RolloutRow]) -> dict[str, float]:
    """Mean reward, response length, truncation and the share of groups with no signal."""
    n = max(len(rows), 1)
    rewards = torch.tensor([float(r.reward) for r in rows])
    flat = zero_variance_groups(rewards, group_indices([r.prompt_id for r in rows]))
    return {
        "reward_mean": sum(r.reward for r in rows) / n,
        "response_length_mean": sum(len(r.response_token_ids) for r in rows) / n,
        "truncated_frac": sum(r.finish_reason == "length" for r in rows) / n,
        "zero_variance_group_frac": float(flat.float().mean()) if flat.numel() else 0.0,
    }


def use_chat_template(mode: str, policy: Policy) -> bool:
    has_template = bool(getattr(policy.tokenizer, "chat_template", None))
    if mode == "always" and not has_template:
        raise ConfigError(f"data.chat_template is 'always' but the tokenizer of {policy.path} has no chat template")
    return mode == "always" or (mode == "auto" and has_template)


def sampling_job(recipe: Recipe, policy: Policy, plugins: Plugins) -> SamplingJob:
    """Sampling with `policy` and the recipe's sampler and verifier (from `plugins`)."""
    return SamplingJob(
        policy=policy,
        sampler=plugins.sampler,
        sampler_name=recipe.sampler.name,
        verifier=plugins.verifier,
        verifier_name=recipe.verifier.name,
        sampler_lock=plugins.sampler_lock,
        prompt_template=recipe.data.prompt_template,
        chat=use_chat_template(recipe.data.chat_template, policy),
        system_prompt=recipe.data.system_prompt,
    )


def load_recipe_policy(recipe: Recipe, path: str | None = None) -> Policy:
    recipe.model.check_device()
    return load_policy(
        path or recipe.model.path,
        dtype=recipe.model.dtype,
        trust_remote_code=recipe.model.trust_remote_code,
        device=recipe.model.device,
    )


def load_split(recipe: Recipe, split: str) -> list[Problem]:
    d = recipe.data
    return load_problems(
        getattr(d, split), d.question_field, d.answer_field, d.id_field, d.preset, getattr(d, f"{split}_split"), d.subset
    )
