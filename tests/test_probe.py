"""`minpro probe` pinned down: on-policy every objective's gradient is the plain policy gradient;
on a policy small enough to enumerate (3 tokens, responses of at most 4), each estimator's
expectation over μ is computed exactly and the probe's sampled gradients converge to it, the
full-sequence importance ratio gives exactly ∇J(π) while the token ratio does not, and the
probe's reference g★ converges to ∇J(π)."""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from minpro_cli.config import load_recipe
from minpro_cli.modeling import load_policy
from minpro_cli.objectives import LOG_RATIO_CLAMP, Objective, ObjectiveInputs, ObjectiveOutput
from minpro_cli.objectives.logratios import log_token_ratio
from minpro_cli.objectives.surrogates import detached_weight_surrogate
from minpro_cli.probe import PolicyGradient, ProbedObjective, ProbeSetup, draw_gradients, gradient, sample
from minpro_cli.registry import load_objective
from minpro_cli.samplers.hf import HFSampler
from minpro_cli.sampling import Plugins, SamplingJob, sampling_job
from minpro_cli.tasks import Problem, load_problems
from minpro_cli.verifiers import VerifyResult

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
EOS, A, B = 0, 1, 2
LENGTH = 4  # max_new_tokens


class SequenceRatio(Objective):
    """Every token weighted by the whole response's ratio ∏_t ρ_t (unclipped): exact in expectation."""

    def __call__(self, inputs: ObjectiveInputs) -> ObjectiveOutput:
        mask = inputs.response_mask.bool()
        log_rho = log_token_ratio(inputs.logprobs, inputs.old_logprobs) * mask
        weight = log_rho.sum(-1, keepdim=True).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp().expand_as(log_rho)
        per_token, _, _ = detached_weight_surrogate(weight, inputs.token_advantages(), inputs.logprobs, 0.0, math.inf)
        return ObjectiveOutput(loss=self.aggregate(per_token, mask))


class CountB:
    """Reward on the whole response: the share of its LENGTH slots that hold `b`."""

    def __call__(self, response: str, reference: str) -> VerifyResult:
        return VerifyResult(reward=response.split().count("b") / LENGTH)


def tiny_policy(directory: Path, seed: int, base: Path | None = None, noise: float = 0.0) -> Path:
    """A 1-layer Llama over {</s>, a, b}; with `base`, that model's weights plus Gaussian noise."""
    vocab = {"</s>": EOS, "a": A, "b": B}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="</s>")
    torch.manual_seed(seed)
    if base is None:
        config = LlamaConfig(vocab_size=3, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                             eos_token_id=EOS, pad_token_id=EOS, bos_token_id=None, tie_word_embeddings=False)  # fmt: skip
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            model.lm_head.weight.mul_(10.0)  # far from uniform: the sequences' probabilities differ
    else:
        model = LlamaForCausalLM.from_pretrained(base)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * p.abs().mean() * torch.randn_like(p))
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


def responses() -> list[list[int]]:
    """Every response the sampler can return: up to LENGTH−1 tokens then EOS, or LENGTH tokens."""
    stopped = [[*w, EOS] for n in range(LENGTH) for w in itertools.product([A, B], repeat=n)]
    return stopped + [list(w) for w in itertools.product([A, B], repeat=LENGTH)]


def token_logprobs(model: torch.nn.Module, response: list[int]) -> torch.Tensor:
    """log π(o_t | a, o_<t) for each token, straight from the model's logits (differentiable)."""
    ids = torch.tensor([[A, *response]])
    logits = model(input_ids=ids).logits[0, :-1].double()
    return torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)


def flat_gradient(model: torch.nn.Module, scalar: torch.Tensor) -> torch.Tensor:
    params = list(model.parameters())
    grads = torch.autograd.grad(scalar, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().double() for g, p in zip(grads, params)])


def exact_expectations(policy_model: torch.nn.Module, behavior_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """E over G i.i.d. responses from μ of each estimator's −∇L, with RLOO advantages and
    seq-mean-token-sum: E[(1/G) Σ_i A_i f(o_i)] = E_μ[R·f] − E_μ[R]·E_μ[f] (o_i independent),
    f(o) = Σ_t w_t ∇log π(o_t), by enumerating every response; and ∇J(π) = E_π[R ∇log π(o)]."""
    weights = {
        "policy gradient": lambda lr: torch.ones_like(lr),
        "sequence ratio": lambda lr: lr.sum().exp().expand_as(lr),
        "token ratio": lambda lr: lr.exp(),
        "prefix ratio": lambda lr: lr.cumsum(0).exp(),
        "minpro": lambda lr: torch.cat([torch.zeros(1, dtype=lr.dtype), lr.cummin(0).values[:-1]]).exp() * lr.exp(),
    }
    mean_r = {name: 0.0 for name in weights}
    mean_f = {name: 0.0 for name in weights}
    mean_rf = {name: 0.0 for name in weights}
    grad_j = 0.0
    total_mu = total_pi = 0.0
    for response in responses():
        logp = token_logprobs(policy_model, response)
        with torch.no_grad():
            logmu = token_logprobs(behavior_model, response)
        mu, pi = float(logmu.sum().exp()), float(logp.detach().sum().exp())
        total_mu, total_pi = total_mu + mu, total_pi + pi
        reward = response.count(B) / LENGTH
        log_ratio = (logp - logmu).detach()
        for name, weight in weights.items():
            f = flat_gradient(policy_model, (weight(log_ratio) * logp).sum())
            mean_r[name] += mu * reward
            mean_f[name] = mean_f[name] + mu * f
            mean_rf[name] = mean_rf[name] + mu * reward * f
        grad_j = grad_j + pi * reward * flat_gradient(policy_model, logp.sum())
    assert total_mu == pytest.approx(1.0, abs=1e-9) and total_pi == pytest.approx(1.0, abs=1e-9)  # all enumerated
    out = {name: mean_rf[name] - mean_r[name] * mean_f[name] for name in weights}
    out["∇J(π)"] = grad_j
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    policy = load_policy(tiny_policy(root / "policy", seed=0))
    behavior = load_policy(tiny_policy(root / "behavior", seed=1, base=root / "policy", noise=1.5))
    return policy, behavior


def tiny_setup(policy, group_size: int, reference_multiple: int) -> ProbeSetup:
    def job(p) -> SamplingJob:
        return SamplingJob(p, HFSampler(max_new_tokens=LENGTH, temperature=1.0, top_p=1.0, top_k=0), "hf",
                           CountB(), "count_b", "{question}")  # fmt: skip

    problems = [Problem(id=f"p{i}", question="a", answer="") for i in range(16)]
    return ProbeSetup(policy, problems, group_size, reference_multiple, job, micro_batch_tokens=None)


def test_probed_gradients_converge_to_the_enumerated_expectations(tiny):
    policy, behavior = tiny
    exact = exact_expectations(copy.deepcopy(policy.model).double(), copy.deepcopy(behavior.model).double())
    # the full-sequence ratio is ∇J(π) exactly (up to the float32 that Llama's RMSNorm computes in,
    # even in a float64 model); the token ratio (and the truncated prefixes) are not
    scale = float(exact["∇J(π)"].norm())
    assert float((exact["sequence ratio"] - exact["∇J(π)"]).norm()) < 1e-5 * scale
    assert float((exact["token ratio"] - exact["∇J(π)"]).norm()) > 0.1 * scale
    assert float((exact["policy gradient"] - exact["∇J(π)"]).norm()) > 0.1 * scale  # μ ≠ π matters

    unclipped = {"eps_low": 1.0, "eps_high": 1e9, "loss_agg": "seq-mean-token-sum"}
    objectives = [
        ProbedObjective("token ratio", load_objective("cispo", **unclipped), "rloo"),
        ProbedObjective("minpro", load_objective("minpro", **unclipped), "rloo"),
        ProbedObjective("prefix ratio", load_objective("prefix", **unclipped), "rloo"),
        ProbedObjective("sequence ratio", SequenceRatio(loss_agg="seq-mean-token-sum"), "rloo"),
    ]
    setup = tiny_setup(policy, group_size=4, reference_multiple=2)
    draws: dict[str, list[torch.Tensor]] = {p.label: [] for p in objectives} | {"g★": [], "g_floor": []}
    for seed in range(50):
        for probed, g, reference in draw_gradients(setup, behavior, objectives, seed):
            draws[probed.label].append(g.double())
        draws["g★"].append(reference.star.double())  # one reference: all share rloo and the aggregation
        draws["g_floor"].append(reference.floor.double())
    references = [("g★", exact["∇J(π)"]), ("g_floor", exact["∇J(π)"])]  # both from π's own samples
    for label, target in [*((p.label, exact[p.label]) for p in objectives), *references]:
        stacked = torch.stack(draws[label])
        mean, se = stacked.mean(0), float((stacked.var(0).sum() / len(stacked)).sqrt())  # s.e. of the mean's norm
        assert float((mean - target).norm()) < 3 * se, f"{label}: {float((mean - target).norm()):.4g} vs s.e. {se:.4g}"
        if label in ("token ratio", "g★", "g_floor"):
            wrong = exact["∇J(π)"] if label == "token ratio" else exact["policy gradient"]  # μ's samples
            assert float((mean - wrong).norm()) > 5 * se  # the test could tell them apart


@pytest.mark.parametrize(
    "name", ["grpo", "dapo", "dr_grpo", "gspo", "cispo", "minpro", "minpro:ppo", "prefix", "m2po"]
)
def test_on_policy_every_objective_gradient_is_the_policy_gradient(name, policy):
    recipe = load_recipe(QUICKSTART)
    objective = load_objective("minpro", clip_mode="ppo") if name == "minpro:ppo" else load_objective(name)
    setup = ProbeSetup(policy, load_problems("embedded:arith-train")[:16], 8, 2, lambda p: sampling_job(recipe, p, Plugins.of(recipe)),
                       micro_batch_tokens=600, length_budget=48)  # several micro-batches, as training cuts them
    rows = sample(setup, policy, seed=0, label="on-policy sample")
    advantage = objective.default_advantage
    ours, metrics = gradient(setup, objective, rows, advantage)
    plain, _ = gradient(setup, PolicyGradient(loss_agg=objective.loss_agg, max_response_length=objective.max_response_length),
                        rows, advantage)  # fmt: skip
    assert abs(metrics["ratios/kl_k1"]) < 1e-5  # μ = π: the sampler's and the trainer's log-probs agree
    assert float(plain.norm()) > 0
    assert float((ours - plain).norm()) < 1e-4 * float(plain.norm())


def test_probe_command_along_a_run(tmp_path):
    """`minpro probe --run`: staleness picks the run's checkpoints; at staleness 0 every objective
    with the same aggregation gives the same numbers (μ = π); JSON, plot, and a clear error for a
    staleness the run cannot give."""
    import json

    from typer.testing import CliRunner

    from minpro_cli.cli import app
    from minpro_cli.train import run_train

    tiny = ["train.prompts_per_iteration=16", "train.group_size=4", "sampler.options.max_new_tokens=32",
            "train.checkpoint_every=1", "train.keep_checkpoints=5", "optim.lr=1e-4", "optim.warmup_steps=0"]  # fmt: skip
    run_train(load_recipe(QUICKSTART, [f"run_dir={tmp_path / 'run'}", "train.iterations=3", *tiny]))
    probe = ["probe", str(QUICKSTART), *tiny, "--run", str(tmp_path / "run"), "--objective", "minpro",
             "--objective", "grpo:loss_agg=token-mean", "--draws", "2", "--reference-multiple", "2"]  # fmt: skip
    result = CliRunner().invoke(app, [*probe, "--staleness", "0,2", "--switch-at", "none,4", "--json",
                                      str(tmp_path / "p.json"), "--plot", str(tmp_path / "plots")])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["policy"].endswith("round_00003") and report["draws"] == 2
    switched = {(c["staleness"], c["objective"]): c for c in report["results"] if c["switch_at"] == 4}
    cells = {(c["staleness"], c["objective"]): c for c in report["results"] if c["switch_at"] is None}
    assert sorted(cells) == sorted(switched) == [(0, "grpo:loss_agg=token-mean"), (0, "minpro"),
                                                 (2, "grpo:loss_agg=token-mean"), (2, "minpro")]  # fmt: skip
    assert switched[2, "minpro"]["behavior"] == "staleness 2, switch at 4"
    # μ = π: switching to π's weights changes nothing (the prefix re-read under the same weights)
    assert switched[0, "minpro"]["cosine"]["draws"] == pytest.approx(cells[0, "minpro"]["cosine"]["draws"], abs=1e-4)
    assert switched[2, "minpro"]["cosine"]["draws"] != pytest.approx(cells[2, "minpro"]["cosine"]["draws"], abs=1e-6)
    for c in cells.values():
        assert len(c["cosine"]["draws"]) == 2 and all(-1 <= v <= 1 for v in c["cosine"]["draws"])
        assert c["reference_error"]["mean"] > 0
    same, other = cells[0, "minpro"]["cosine"]["draws"], cells[0, "grpo:loss_agg=token-mean"]["cosine"]["draws"]
    assert same == pytest.approx(other, abs=1e-4)  # on-policy both are the policy gradient
    assert abs(cells[0, "minpro"]["kl"]["mean"]) < 1e-4  # KL(μ‖π) of μ = π
    assert (tmp_path / "plots" / "probe.png").stat().st_size > 10_000
    missing = CliRunner().invoke(app, [*probe, "--staleness", "0,7"])
    assert missing.exit_code == 2 and "no checkpoint 7 steps before step 3" in missing.output
