"""Sampling, as every stage does it: problems × group size → responses → rewards → rollout rows
(`RolloutRow`s, which `rollouts.py` writes), with the recipe's sampler, verifier and prompt
template. `Plugins` resolves a recipe's plugins once; a stage passes it down."""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from minpro_cli.advantages import group_indices, zero_variance_groups
from minpro_cli.config import Recipe
from minpro_cli.console import progress_bar, warn
from minpro_cli.errors import ConfigError, PluginError
from minpro_cli.hardware import emulated_bf16_advice
from minpro_cli.modeling import Policy, load_policy, model_fingerprint, tokenizer_fingerprint
from minpro_cli.objectives import Objective
from minpro_cli.registry import load_plugin
from minpro_cli.rollouts import RolloutRow
from minpro_cli.samplers import Generation, Sampler, WeightSwitch
from minpro_cli.tasks import Problem, load_problems, render_prompt
from minpro_cli.verifiers import Verifier, VerifierCallError, VerifyResult, timed_out, verify_batch

# progress granularity; each chunk gets its own derived seed. A sampler's `prompts_per_call`
# overrides it (None: the whole batch in one call, for engines that schedule their own batches)
PROMPTS_PER_CHUNK = 64


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


@dataclass(frozen=True)
class VersionSchedule:
    """Weights that change while responses are drawn (`train.partial_rollout`): segment i's
    weights draw every response token from `starts[i]` on (`starts[0]` is 0). `load(i)` puts
    them into the sampling policy and returns their policy version; it may wait until the
    trainer publishes them."""

    starts: tuple[int, ...]
    load: Callable[[int], int]

    def switches(self, versions: dict[int, int]) -> list[WeightSwitch]:
        """The sampler's switches; each records the version it loaded in `versions`."""
        def load(i: int) -> None:
            versions[i] = self.load(i)

        return [WeightSwitch(at, functools.partial(load, i)) for i, at in enumerate(self.starts)]

    def token_versions(self, versions: dict[int, int], n_tokens: int) -> list[int]:
        return [versions[bisect.bisect_right(self.starts, t) - 1] for t in range(n_tokens)]


def sample_rows(
    job: SamplingJob, problems: list[Problem], group_size: int, seed: int, label: str = "sampling",
    schedule: VersionSchedule | None = None,
) -> tuple[list[RolloutRow], float]:  # fmt: skip
    """Rows for `group_size` responses per problem, and tokens/s. With a `schedule` the weights
    change mid-response (the sampler must declare `switches_weights`): each row's
    `behavior_versions` says which version drew each token, its `policy_version` is the first."""
    tok = job.policy.tokenizer
    versions: dict[int, int] = {}
    if schedule is not None and not getattr(job.sampler, "switches_weights", False):
        raise ConfigError(f"sampler '{job.sampler_name}' cannot switch weights mid-response (partial rollouts, "
                          "probe --switch-at): use sampler.name=hf")  # fmt: skip
    if schedule is not None:
        job.policy_version = versions[0] = schedule.load(0)  # the fingerprint is the first weights'
    fingerprints = (model_fingerprint(job.policy.model), tokenizer_fingerprint(tok))
    prompts = [job.prompt(p) for p in problems]
    prompt_ids = [tok.encode(text, add_special_tokens=False) for text in prompts]
    check_context_window(job, problems, prompt_ids)
    rows: list[RolloutRow] = []
    n_tokens, started, sample_indices = 0, time.perf_counter(), defaultdict[str, Iterator[int]](itertools.count)
    with progress_bar(label, total=len(problems) * group_size) as bar:
        per_call = getattr(job.sampler, "prompts_per_call", PROMPTS_PER_CHUNK) or max(len(problems), 1)
        for chunk_index, start in enumerate(range(0, len(problems), per_call)):
            chunk = list(range(start, min(start + per_call, len(problems))))
            chunk_seed = (seed * 1_000_003 + chunk_index) % 2**63  # any recipe seed: within torch's range
            expanded = [prompt_ids[i] for i in chunk for _ in range(group_size)]
            switching = {"switches": schedule.switches(versions)} if schedule is not None else {}
            with job.sampler_lock, job.policy.autocast():  # μ is computed at the precision π_θ trains at
                generations = job.sampler.generate(job.policy, expanded, seed=chunk_seed, **switching)
            check_generations(job, expanded, generations)
            responses = [tok.decode(gen.token_ids, skip_special_tokens=True) for gen in generations]
            owners = [problems[chunk[offset // group_size]] for offset in range(len(generations))]
            row_prompts = [prompts[chunk[offset // group_size]] for offset in range(len(generations))]
            results = scored(job, responses, owners, row_prompts, generations, group_size)
            for offset, (problem, gen, response, result) in enumerate(zip(owners, generations, responses, results)):
                n_tokens += len(gen.token_ids)
                rows.append(RolloutRow(
                    prompt_id=problem.id,
                    sample_index=next(sample_indices[problem.id]),  # a problem twice in a call: 0..2g−1
                    prompt=row_prompts[offset],
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
                    behavior_versions=schedule.token_versions(versions, len(gen.token_ids)) if schedule else None,
                ))  # fmt: skip
            bar.advance(len(generations))
    return rows, n_tokens / max(time.perf_counter() - started, 1e-9)


def check_context_window(job: SamplingJob, problems: list[Problem], prompt_ids: list[list[int]]) -> None:
    """Every prompt plus the sampler's max_new_tokens fits the model's context window: past it
    one model samples garbage silently and another crashes."""
    window = getattr(job.policy.model.config, "max_position_embeddings", None)
    budget = getattr(job.sampler, "max_new_tokens", None)
    if not isinstance(window, int):
        return
    budget = budget if isinstance(budget, int) else 0
    longest = max(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]), default=None)
    if longest is not None and len(prompt_ids[longest]) + budget > window:
        raise ConfigError(
            f"problem '{problems[longest].id}': its prompt is {len(prompt_ids[longest])} tokens, which with "
            f"sampler.options.max_new_tokens={budget} exceeds the model's context window of {window} tokens "
            f"({job.policy.path}); drop or shorten long prompts, or lower max_new_tokens"
        )


def check_generations(job: SamplingJob, prompts: list[list[int]], generations: list[Generation]) -> None:
    """A sampler plugin's output, checked before anything is scored or written: one generation
    per prompt, one finite log-prob ≤ 0 per token, token ids in the vocabulary."""
    name, vocab = job.sampler_name, job.policy.vocab_size
    fix = f"the sampler plugin '{name}' is at fault: fix it, or use sampler.name=hf"
    if len(generations) != len(prompts):
        raise PluginError(f"sampler '{name}' returned {len(generations)} generations for {len(prompts)} prompts; {fix}")
    for i, gen in enumerate(generations):
        where = f"sampler '{name}', generation {i}"
        if len(gen.logprobs) != len(gen.token_ids):
            raise PluginError(f"{where}: {len(gen.token_ids)} tokens but {len(gen.logprobs)} log-probs; {fix}")
        if not gen.token_ids:
            raise PluginError(f"{where}: no tokens (a response has at least its EOS); {fix}")
        bad = next((x for x in gen.logprobs if not (isinstance(x, int | float) and -math.inf < x <= 0.0)), None)
        if bad is not None:  # NaN fails the comparison too
            raise PluginError(f"{where}: log-prob {bad!r} is not a finite log-probability ≤ 0; {fix}")
        outside = next((t for t in gen.token_ids if not 0 <= t < vocab), None)
        if outside is not None:
            raise PluginError(f"{where}: token id {outside} is outside the vocabulary (0..{vocab - 1}); {fix}")


def scored(
    job: SamplingJob,
    responses: list[str],
    problems: list[Problem],
    prompts: list[str],
    generations: list[Generation],
    group_size: int,
) -> list[VerifyResult]:
    """The verifier's results, checked: a call that raises, or a reward that is not a finite
    number, is an error naming the verifier and the row; timeouts score 0 with a warning. A
    verifier that takes the row's context (`python`) gets its prompt, tokens and columns."""
    name = job.verifier_name
    contexts = [
        {"prompt": prompt, "messages": problem.messages, "prompt_id": problem.id, "completion_ids": gen.token_ids,
         "columns": problem.columns}
        for problem, prompt, gen in zip(problems, prompts, generations)
    ]  # fmt: skip

    def row(index: int) -> str:
        return f"problem '{problems[index].id}', sample {index % group_size}"

    try:
        results = verify_batch(job.verifier, responses, [p.answer for p in problems], contexts=contexts)
    except VerifierCallError as exc:
        raise PluginError(f"verifier '{name}' on {row(exc.index)}: {exc}; fix the verifier, then rerun") from None
    if len(results) != len(responses):
        raise PluginError(f"verifier '{name}' returned {len(results)} results for {len(responses)} responses")
    for index, result in enumerate(results):
        reward = getattr(result, "reward", None)
        if isinstance(reward, bool) or not isinstance(reward, int | float) or not math.isfinite(reward):
            raise PluginError(
                f"verifier '{name}' on {row(index)}: reward {reward!r} is not a finite number; fix the verifier, then "
                "rerun (nothing was trained on it)"
            )
    stalled = [i for i, result in enumerate(results) if timed_out(result)]
    if stalled:
        warn(f"verifier '{name}' timed out on {len(stalled)} response(s), first {row(stalled[0])}: scored 0")
    return results


def summarize_rows(rows: list[RolloutRow]) -> dict[str, float]:
    """Mean reward, response length, truncation and the share of groups with no signal; with
    several weighted reward functions (`python` verifier), each one's mean as `reward/<name>`."""
    n = max(len(rows), 1)
    rewards = torch.tensor([float(r.reward) for r in rows])
    flat = zero_variance_groups(rewards, group_indices([r.prompt_id for r in rows]))
    return {
        "reward_mean": sum(r.reward for r in rows) / n,
        "response_length_mean": sum(len(r.response_token_ids) for r in rows) / n,
        "truncated_frac": sum(r.finish_reason == "length" for r in rows) / n,
        "zero_variance_group_frac": float(flat.float().mean()) if flat.numel() else 0.0,
        **reward_parts(rows),
    }


def reward_parts(rows: list[RolloutRow]) -> dict[str, float]:
    """`reward/<name>`: the mean of each reward function over the rows where it applied."""
    if not rows or '"rewards"' not in rows[0].verifier_details:
        return {}
    parts: defaultdict[str, list[float]] = defaultdict(list)
    for row in rows:
        for name, value in (json.loads(row.verifier_details).get("rewards") or {}).items():
            if value is not None:
                parts[name].append(float(value))
    return {f"reward/{name}": sum(values) / len(values) for name, values in parts.items()}


def use_chat_template(mode: str, policy: Policy, preset: str | None = None) -> bool:
    """Whether text prompts are wrapped in the chat template; `auto` under `data.preset=trl`
    leaves them as text, as TRL does (its conversational prompts still use the template)."""
    has_template = bool(getattr(policy.tokenizer, "chat_template", None))
    if mode == "always" and not has_template:
        raise ConfigError(f"data.chat_template is 'always' but the tokenizer of {policy.path} has no chat template")
    return mode == "always" or (mode == "auto" and has_template and preset != "trl")


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
        chat=use_chat_template(recipe.data.chat_template, policy, recipe.data.preset),
        system_prompt=recipe.data.system_prompt,
    )


def load_recipe_policy(recipe: Recipe, path: str | None = None) -> Policy:
    recipe.model.check_device()
    if recipe.model.dtype == "bfloat16" and (advice := emulated_bf16_advice("model.dtype", recipe.model.device)):
        warn(advice)
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
