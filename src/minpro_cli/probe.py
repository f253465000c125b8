"""`minpro probe`: how close each objective's off-policy gradient comes to the on-policy one.

At θ = π (the policy) and for a behaviour policy μ (an older checkpoint), each draw samples

    S_μ  G responses per prompt from μ          g_obj   = −∇_θ L_obj(θ; S_μ)   every objective
    S_π  as many, fresh from π                  g_floor = −∇_θ L_pg(θ; S_π)    (ρ ≡ 1)
    S★   K times as many, fresh from π          g★      = mean of K −∇_θ L_pg(θ; S★_k)

where L_pg = −agg(Â·log π_θ) is what every objective reduces to on-policy (its own `loss_agg`
and advantage estimator; tested). It reports cos(g_obj, g★) and ‖g_obj‖/‖g★‖, and the same for
g_floor: the noise floor, what a perfect correction would reach with samples of that size.
g★'s own relative standard error is ε★ = √(Σ_k ‖g_k − g★‖² / K(K−1)) / ‖g★‖. Draws are
independent; every number is a mean ± standard error over them. The objectives share each
draw's samples, so their differences are paired.

Gradients are those `minpro train` takes (`update_step`: micro-batches, the minibatch's counts,
Dr.GRPO's L), as flat float32 vectors: memory is O(parameters) per reference gradient plus one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from minpro_cli.checkpoints import complete_checkpoints, saved_policy_step
from minpro_cli.config import Recipe, parse_override
from minpro_cli.console import console
from minpro_cli.errors import ConfigError, InputFileError, PluginError
from minpro_cli.modeling import Policy
from minpro_cli.objectives import AdvantageEstimator, LossAgg, Objective, ObjectiveInputs, ObjectiveOutput
from minpro_cli.probe_results import QUANTITIES, Cell, DrawResult
from minpro_cli.registry import load_plugin
from minpro_cli.rollouts import RolloutRow
from minpro_cli.sampling import (
    Plugins,
    SamplingJob,
    VersionSchedule,
    load_recipe_policy,
    load_split,
    sample_rows,
    sampling_job,
)
from minpro_cli.step import Trainee, training_batch, update_step
from minpro_cli.tasks import Problem


class PolicyGradient(Objective):
    """The plain policy gradient, L = −agg(Â_{i,t} · log π_θ(o_t | …)): every objective's
    gradient when μ = π (ρ ≡ 1, nothing clipped)."""

    def __call__(self, inputs: ObjectiveInputs) -> ObjectiveOutput:
        per_token = -inputs.token_advantages() * inputs.logprobs
        return ObjectiveOutput(loss=self.aggregate(per_token, inputs.response_mask.bool(), inputs.counts))


@dataclass(frozen=True)
class ProbedObjective:
    label: str  # as the user named it: `minpro` or `minpro:clip_mode=ppo`
    objective: Objective
    advantage: AdvantageEstimator

    @property
    def on_policy(self) -> tuple[AdvantageEstimator, LossAgg, int | None]:
        """What its on-policy gradient depends on: objectives that agree here share g★ and g_floor."""
        return self.advantage, self.objective.loss_agg, self.objective.max_response_length

    def reference(self) -> PolicyGradient:
        return PolicyGradient(loss_agg=self.objective.loss_agg, max_response_length=self.objective.max_response_length)


@dataclass
class ProbeSetup:
    """What every draw shares: the policy, the prompts, and how samples are drawn and trained on."""

    policy: Policy
    problems: list[Problem]
    group_size: int
    reference_multiple: int  # K: g★ comes from K times the behaviour sample
    job: Callable[[Policy], SamplingJob]  # a sampling job (sampler, verifier, prompt form) for a policy
    micro_batch_tokens: int | None = None
    length_budget: int | None = None  # Dr.GRPO's L when an objective pins none (the sampler's budget)


def gradient(
    setup: ProbeSetup, objective: Objective, rows: list[RolloutRow], advantage: AdvantageEstimator
) -> tuple[torch.Tensor, dict[str, float]]:
    """−∇_θ L at the policy's weights, as one flat float32 vector (the ascent direction), and the
    step's metrics (`ratios/kl_k1`: KL(μ‖π) per token of the sample)."""
    batch = training_batch(rows, advantage, drop_zero_variance=False)
    assert batch is not None
    module = setup.policy.model
    trainee = Trainee(module, setup.policy.pad_token_id, compute_dtype=setup.policy.compute_dtype,
                      micro_batch_tokens=setup.micro_batch_tokens)  # fmt: skip
    no_step = torch.optim.SGD(module.parameters(), lr=0.0)  # update_step's gradient, weights untouched
    metrics = update_step(trainee, no_step, objective, batch, grad_clip=math.inf, length_budget=setup.length_budget)
    grads = [(-p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float() for p in module.parameters()]
    module.zero_grad(set_to_none=True)
    return torch.cat(grads), metrics


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """NaN when either is 0 (every reward of the sample equal): no direction to compare."""
    a, b = a.double(), b.double()
    norms = float(a.norm() * b.norm())
    return float(a @ b) / norms if norms else math.nan


def norm_ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    size = float(b.double().norm())
    return float(a.double().norm()) / size if size else math.nan


def sample(setup: ProbeSetup, policy: Policy, seed: int, label: str) -> list[RolloutRow]:
    return sample_rows(setup.job(policy), setup.problems, setup.group_size, seed, label)[0]


def switching_sample(setup: ProbeSetup, behavior: Policy, at: int, seed: int) -> list[RolloutRow]:
    """A sample whose responses μ starts and π continues from token `at` on (an in-flight update
    to the newest weights, the prefix re-read under them): version 0 is μ's, version 1 π's."""
    sampling = behavior.copy()
    weights = [behavior.model.state_dict(), setup.policy.model.state_dict()]

    def load(segment: int) -> int:
        sampling.model.load_state_dict(weights[segment])
        return segment

    schedule = VersionSchedule((0, at), load)
    label = f"behaviour sample, switched at token {at}"
    return sample_rows(setup.job(sampling), setup.problems, setup.group_size, seed, label, schedule)[0]


@dataclass
class Reference:
    """The on-policy gradients an objective is compared with, in one draw."""

    star: torch.Tensor  # g★, from K fresh samples of π
    floor: torch.Tensor  # g_floor, from one fresh sample of π as large as μ's
    error: float  # ε★, g★'s relative standard error


def reference_gradients(setup: ProbeSetup, objectives: list[ProbedObjective], seed: int) -> dict[Any, Reference]:
    """g★ (K fresh samples of π) and g_floor (one more) for each kind of on-policy gradient
    among `objectives`; a draw shares them across behaviour policies."""
    policy = setup.policy
    floor_rows = sample(setup, policy, seed * 1_009 + 1, "on-policy sample")
    reference_rows = [sample(setup, policy, seed * 1_009 + 2 + k, f"reference sample {k + 1}")
                      for k in range(setup.reference_multiple)]  # fmt: skip
    references: dict[Any, Reference] = {}
    for probed in objectives:
        if probed.on_policy in references:
            continue
        pg, advantage = probed.reference(), probed.advantage
        total, squares = None, 0.0  # running sums: one gradient held at a time, not K
        for rows in reference_rows:
            g = gradient(setup, pg, rows, advantage)[0].double()
            total = g if total is None else total.add_(g)
            squares += float(g.norm() ** 2)
        assert total is not None
        k = len(reference_rows)
        star = total.div_(k)
        spread = max(0.0, squares - k * float(star.norm() ** 2))  # Σ_k ‖g_k − g★‖²
        star = star.float()
        size = float(star.double().norm())  # 0 when every group's rewards were equal
        error = math.sqrt(spread / (k * (k - 1))) / size if size else math.nan
        references[probed.on_policy] = Reference(star, gradient(setup, pg, floor_rows, advantage)[0], error)
    return references


def behavior_gradients(
    setup: ProbeSetup, behavior: Policy, objectives: list[ProbedObjective], seed: int, switch_at: int | None = None
) -> Iterator[tuple[ProbedObjective, torch.Tensor, float]]:
    """Each objective's g_obj on one fresh sample of μ (the same sample for all: paired), one at
    a time, with KL(μ‖π) per token of that sample (how far μ drifted, whatever the steps say).
    `switch_at`: the responses switch to π's weights at that token (a mixed-version sample)."""
    rows = sample(setup, behavior, seed * 1_009, "behaviour sample") if switch_at is None \
        else switching_sample(setup, behavior, switch_at, seed * 1_009)  # fmt: skip
    for probed in objectives:
        g, metrics = gradient(setup, probed.objective, rows, probed.advantage)
        yield probed, g, metrics["ratios/kl_k1"]


def draw_gradients(
    setup: ProbeSetup, behavior: Policy, objectives: list[ProbedObjective], seed: int
) -> Iterator[tuple[ProbedObjective, torch.Tensor, Reference]]:
    """One draw for one behaviour: each objective's g_obj with its reference."""
    references = reference_gradients(setup, objectives, seed)
    for probed, g, _ in behavior_gradients(setup, behavior, objectives, seed):
        yield probed, g, references[probed.on_policy]


def draw_result(g: torch.Tensor, ref: Reference, kl: float) -> DrawResult:
    return DrawResult(cosine(g, ref.star), norm_ratio(g, ref.star), cosine(ref.floor, ref.star),
                      norm_ratio(ref.floor, ref.star), ref.error, kl)  # fmt: skip


def parse_objective(spec: str, recipe: Recipe) -> ProbedObjective:
    """`name` or `name:key=value,key=value` → the objective with those options (recipe's advantage
    estimator if it names one, else the objective's own)."""
    name, _, options_text = spec.partition(":")
    options = dict(parse_override(item) for item in options_text.split(",") if item.strip()) if options_text else {}
    try:
        objective: Objective = load_plugin("objectives", name.strip(), options)
    except PluginError as exc:
        raise ConfigError(f"--objective {spec}: {exc}") from None
    return ProbedObjective(spec, objective, recipe.train.advantage or objective.default_advantage)


@dataclass(frozen=True)
class Behavior:
    label: str  # the checkpoint path, or `staleness N`
    path: str
    staleness: int | None = None
    switch_at: int | None = None  # its responses continue under π's weights from this token on

    def switched(self, at: int | None) -> Behavior:
        """This behaviour, its responses switching to π at token `at` (None: not switching)."""
        if at is None:
            return self
        return Behavior(f"{self.label}, switch at {at}", self.path, self.staleness, at)


def behaviors_of_run(run_dir: Path, staleness: list[int], policy: str | None) -> tuple[str, list[Behavior]]:
    """The policy (`policy`, else the run's latest checkpoint) and, for each staleness s, the
    run's checkpoint that is s optimizer steps older."""
    steps = {saved_policy_step(p): p for p in complete_checkpoints(run_dir)}
    if not steps:
        raise InputFileError(f"{run_dir}: no complete checkpoints; train with train.checkpoint_every=1 and a large "
                             "train.keep_checkpoints to probe along the run")  # fmt: skip
    policy_dir = Path(policy) if policy else steps[max(s for s in steps if s is not None)]
    policy_step = saved_policy_step(policy_dir)
    if policy_step is None:
        raise InputFileError(f"{policy_dir}: no trainer_state.json, so its optimizer step is unknown; pass --behavior")
    out = []
    for s in staleness:
        found = policy_dir if s == 0 else steps.get(policy_step - s)
        if found is None:
            have = sorted(policy_step - k for k in steps if k is not None and k <= policy_step)
            raise InputFileError(f"{run_dir}: no checkpoint {s} steps before step {policy_step} (staleness available: "
                                 f"{have}); keep more checkpoints (train.keep_checkpoints, train.checkpoint_every)")  # fmt: skip
        out.append(Behavior(f"staleness {s}", str(found), s))
    return str(policy_dir), out


def run_probe(
    recipe: Recipe, policy_path: str, behaviors: list[Behavior], objective_specs: list[str], draws: int,
    prompts: int | None = None, reference_multiple: int = 8,
) -> list[Cell]:  # fmt: skip
    """Every behaviour × objective over `draws` draws. Each draw's reference is shared by every
    behaviour; the policy stays loaded, behaviours load in turn."""
    if draws < 1 or reference_multiple < 2:
        raise ConfigError("--draws must be ≥ 1 and --reference-multiple ≥ 2 (g★'s error is estimated from its parts)")
    objectives = [parse_objective(spec, recipe) for spec in objective_specs or [recipe.objective.name]]
    problems = load_split(recipe, "train")[: prompts or recipe.train.prompts_per_iteration]
    plugins = Plugins.of(recipe)
    setup = ProbeSetup(
        policy=load_recipe_policy(recipe, policy_path),
        problems=problems,
        group_size=recipe.train.group_size,
        reference_multiple=reference_multiple,
        job=lambda policy: sampling_job(recipe, policy, plugins),
        micro_batch_tokens=recipe.train.micro_batch_tokens,
        length_budget=plugins.generation_budget,
    )
    cells = {(b.label, p.label): Cell(b.label, b.staleness, p.label, switch_at=b.switch_at)
             for b in behaviors for p in objectives}  # fmt: skip
    for draw in range(draws):
        seed = recipe.seed * 100_003 + draw
        console.print(f"draw {draw + 1}/{draws}: the on-policy reference")
        references = reference_gradients(setup, objectives, seed)
        for behavior in behaviors:
            console.print(f"draw {draw + 1}/{draws}: {behavior.label}")
            mu = setup.policy if behavior.path == policy_path else load_recipe_policy(recipe, behavior.path)
            for probed, g, kl in behavior_gradients(setup, mu, objectives, seed, behavior.switch_at):
                cells[behavior.label, probed.label].add(draw_result(g, references[probed.on_policy], kl))
    return list(cells.values())


def print_cells(cells: list[Cell]) -> None:
    table = Table(title="cos(g_obj, g★) and ‖g_obj‖/‖g★‖: mean ± s.e. over draws (floor: fresh on-policy sample)")
    for column in ("behaviour", "KL(μ‖π)", "objective", "cos", "norm ratio", "floor cos", "floor norm", "ε★"):
        table.add_column(column, overflow="fold")
    for c in cells:
        s = c.summaries
        table.add_row(c.behavior, f"{round(s['kl'].mean, 4) + 0.0:.4f}", c.objective,  # no "-0.0000"
                      *(f"{s[q].mean:.3f} ± {s[q].se:.3f}" for q in QUANTITIES[:4]), f"{s['reference_error'].mean:.3f}")  # fmt: skip
    console.print(table)


def report(cells: list[Cell], policy: str, settings: dict[str, Any]) -> dict[str, Any]:
    return {"policy": policy, **settings, "results": [c.as_json() for c in cells]}
