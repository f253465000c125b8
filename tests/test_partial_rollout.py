"""Responses written by several policies (train.partial_rollout): the hf sampler switches weights
mid-response, each token's log μ is that of its own version's weights, and the rows say which
version drew each token."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from minpro_cli.rollouts import read_rollout_rows
from minpro_cli.samplers import WeightSwitch, policy_logprobs
from minpro_cli.samplers.hf import HFSampler

PROMPTS = ["Compute 12+7-3.\n", "Compute 5-9.\n", "Compute 40+1+2-8.\n"]
SWITCH = 5  # the token where the weights change


@pytest.fixture(scope="module")
def two_versions(policy):
    """The embedded policy's weights (version A) and a perturbed copy of them (version B)."""
    generator = torch.Generator().manual_seed(0)
    newer = {k: v + 0.03 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
             for k, v in policy.model.state_dict().items()}  # fmt: skip
    return {k: v.clone() for k, v in policy.model.state_dict().items()}, newer


def switching(sampling, weights_a, weights_b, at=SWITCH):
    return [WeightSwitch(0, lambda: sampling.model.load_state_dict(weights_a)),
            WeightSwitch(at, lambda: sampling.model.load_state_dict(weights_b))]  # fmt: skip


@pytest.mark.parametrize("batch_size", [256, 5])  # one batch, and several (each replays the switches)
def test_each_tokens_logprob_is_a_forward_of_its_own_versions_weights(policy, two_versions, batch_size):
    weights_a, weights_b = two_versions
    sampling = policy.copy()
    prompts = [policy.tokenizer.encode(t, add_special_tokens=False) for t in PROMPTS] * 4
    sampler = HFSampler(max_new_tokens=30, batch_size=batch_size)
    gens = sampler.generate(sampling, prompts, seed=3, switches=switching(sampling, weights_a, weights_b))
    sampling.model.load_state_dict(weights_a)
    under_a = policy_logprobs(sampling, prompts, gens)
    sampling.model.load_state_dict(weights_b)
    under_b = policy_logprobs(sampling, prompts, gens)
    switched = [g for g in gens if len(g.token_ids) > SWITCH]
    assert len(switched) >= len(gens) // 2  # most responses cross the switch
    gap = max((a[SWITCH:] - b[SWITCH:]).abs().max().item() for a, b, g in zip(under_a, under_b, gens)
              if len(g.token_ids) > SWITCH)  # fmt: skip
    assert gap > 1e-2  # the two versions differ enough for the check below to tell them apart
    for g, a, b in zip(gens, under_a, under_b):
        recorded = torch.tensor(g.logprobs)
        torch.testing.assert_close(recorded[:SWITCH], a[:SWITCH], atol=1e-4, rtol=0)
        torch.testing.assert_close(recorded[SWITCH:], b[SWITCH:], atol=1e-4, rtol=0)


def test_tokens_before_the_switch_are_those_drawn_without_one(policy, two_versions):
    weights_a, weights_b = two_versions
    sampling = policy.copy()
    prompts = [policy.tokenizer.encode(t, add_special_tokens=False) for t in PROMPTS] * 2
    sampler = HFSampler(max_new_tokens=20)
    sampling.model.load_state_dict(weights_a)
    plain = sampler.generate(sampling, prompts, seed=9)
    switched = sampler.generate(sampling, prompts, seed=9, switches=switching(sampling, weights_a, weights_b))
    again = sampler.generate(sampling, prompts, seed=9, switches=switching(sampling, weights_a, weights_b))
    assert [g.token_ids[:SWITCH] for g in switched] == [g.token_ids[:SWITCH] for g in plain]
    assert [g.token_ids for g in switched] == [g.token_ids for g in again]  # reproducible for a seed
    assert [g.token_ids for g in switched] != [g.token_ids for g in plain]


def test_a_partial_rollout_run_stamps_each_tokens_version_counts_staleness_and_pipelines_bit_for_bit(tmp_path):
    """Staleness 2, switches at tokens 3 and 6, one optimizer step per round: round r's tokens
    come from the weights of rounds r−2, r−1 and r (steps r−2, r−1, r, never before 0). The
    staleness metrics equal a count made from the files; the pipelined twin is the same run."""
    from test_pipeline import recipe

    from minpro_cli.train import run_train

    runs = {}
    for mode in ("false", "true"):
        final = run_train(recipe(tmp_path / mode, "train.staleness=2", "train.iterations=4", "train.minibatches=1",
                                 "train.partial_rollout={switch_at: [3, 6]}", f"train.pipeline={mode}"))  # fmt: skip
        metrics = [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
        rows = [read_rollout_rows(tmp_path / mode / "rollouts" / f"round_{r:05d}.parquet") for r in range(4)]
        runs[mode] = (load_file(str(final / "model.safetensors")), metrics, rows)
    weights, metrics, rounds = runs["false"]
    expected_sources = {0: (0, 0, 0), 1: (0, 0, 1), 2: (0, 1, 2), 3: (1, 2, 3)}  # the round's weights at 0, 3, 6
    for r, rows in enumerate(rounds):
        assert [m["step"] for m in metrics][r] == r + 1
        for row in rows:
            n = len(row.response_token_ids)
            by_token = [expected_sources[r][0]] * min(n, 3) + [expected_sources[r][1]] * max(0, min(n, 6) - 3) \
                + [expected_sources[r][2]] * max(0, n - 6)  # fmt: skip
            assert row.behavior_versions == by_token and row.policy_version == by_token[0]
        ages = [r - v for row in rows for v in row.behavior_versions]  # round r trains the weights of step r
        record = metrics[r]
        assert record["staleness/token_mean"] == pytest.approx(sum(ages) / len(ages), abs=1e-9)
        assert (record["staleness/oldest"], record["staleness/newest"]) == (max(ages), min(ages))
        assert record["spans"] == pytest.approx(sum(len(set(row.behavior_versions)) for row in rows) / len(rows))
    assert max(m["spans"] for m in metrics) > 2  # three versions wrote some responses
    weights_p, metrics_p, rounds_p = runs["true"]
    assert all(torch.equal(weights[k], weights_p[k]) for k in weights)
    assert [{k: v for k, v in m.items() if k != "time_s"} for m in metrics] == [
        {k: v for k, v in m.items() if k != "time_s"} for m in metrics_p
    ]
    assert rounds == rounds_p


# One response whose μ changes at token 2 (versions 0, 0, 3, 3, 3): the old version was far from
# π_θ (ρ = 0.5, 0.8), the new one close (ρ = 1.0, 1.1, 1.0). A = 1, token-mean over 5 tokens, so
# ∂L/∂log π_θ(o_t) = −w_t / 5 with w_t each objective's weight, computed by hand:
ACROSS_A_SWITCH = {
    "cispo": [0.5, 0.8, 1.0, 1.1, 1.0],  # ρ_t: forgets the old version's mismatch at the switch
    "grpo": [0.5, 0.8, 1.0, 1.1, 1.0],  # PPO clip: ρ_t where unclipped (A > 0, ρ < 1.2), likewise
    "minpro": [0.5, 0.4, 0.5, 0.55, 0.5],  # ρ̲_t·ρ_t: min(0.5, 0.8) = 0.5 carried past the switch
    "prefix": [0.5, 0.4, 0.4, 0.44, 0.44],  # ∏ ρ_i: the old version's product compounds on
}


@pytest.mark.parametrize("name", sorted(ACROSS_A_SWITCH))
def test_objectives_weigh_tokens_across_a_switch_as_their_formulas_say(name):
    from minpro_cli.objectives import ObjectiveInputs
    from minpro_cli.registry import load_plugin

    pi = torch.tensor([[0.2, 0.4, 0.5, 0.55, 0.5]], dtype=torch.float64).log().requires_grad_()
    mu = torch.tensor([[0.4, 0.5, 0.5, 0.5, 0.5]], dtype=torch.float64).log()
    versions = torch.tensor([[0, 0, 3, 3, 3]])
    inputs = ObjectiveInputs(pi, mu, torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 5, dtype=torch.bool),
                             behavior_logprobs=mu, behavior_versions=versions)  # fmt: skip
    load_plugin("objectives", name, {"loss_agg": "token-mean"})(inputs).loss.backward()
    expected = -torch.tensor([ACROSS_A_SWITCH[name]], dtype=torch.float64) / 5
    torch.testing.assert_close(pi.grad, expected, rtol=1e-12, atol=1e-12)


def test_the_trainer_hands_each_tokens_version_to_the_objective(policy):
    from minpro_cli.objectives import Objective, ObjectiveInputs, ObjectiveOutput
    from minpro_cli.step import RolloutBatch, Trainee, update_step

    seen = []

    class Recording(Objective):
        def __call__(self, inputs: ObjectiveInputs) -> ObjectiveOutput:
            seen.append((inputs.behavior_versions.tolist(), inputs.response_mask.tolist()))
            return ObjectiveOutput(loss=(inputs.logprobs * 0).sum())

    batch = RolloutBatch(prompts=[[5, 6], [5]], responses=[[7, 8, 9, 2], [7, 2]],
                         behavior_logprobs=[[-1.0] * 4, [-1.0] * 2], advantages=torch.tensor([1.0, -1.0]),
                         temperature=1.0, versions=[[4, 4, 6, 6], [5, 5]])  # fmt: skip
    optimizer = torch.optim.SGD(policy.model.parameters(), lr=0.0)
    update_step(Trainee(policy.model, policy.pad_token_id), optimizer, Recording(), batch, 1.0)
    assert seen == [([[4, 4, 6, 6], [5, 5, 5, 5]], [[True] * 4, [True, True, False, False]])]


def test_inspect_ratios_by_version_boundary_by_hand(tmp_path):
    """A response switched at token 3 (ρ = 0.5 before, 1 after) and one never switched: each
    bin's statistics by hand, and the figure."""
    import math

    from test_rollouts import make_row

    from minpro_cli.inspect_ratios import InspectOptions, inspect_ratios
    from minpro_cli.rollouts import write_rollouts

    half = math.log(0.5)
    switched = make_row(n=6) | {"behavior_logprobs": [-1.0] * 6, "target_logprobs": [-1.0 + half] * 3 + [-1.0] * 3,
                                "behavior_versions": [0, 0, 0, 2, 2, 2]}  # fmt: skip
    plain = make_row(index=1, n=2) | {"target_logprobs": [-0.5] * 2}
    write_rollouts(tmp_path / "r.parquet", [switched, plain], {})
    report = inspect_ratios(str(tmp_path / "r.parquet"), None, InspectOptions(by="version_boundary"),
                            plot_dir=tmp_path / "plots")  # fmt: skip
    bins = {b["bin"]: b for b in report["version_boundary"]}
    assert {k: b["count"] for k, b in bins.items()} == {"no switch": 2, "−4…−2": 2, "−1": 1, "0": 1, "1": 1, "2…4": 1}
    expected = {  # (mean log ρ_t, mean ρ̲_t, mean log ρ_1:t)
        "−4…−2": (half, (1 + 0.5) / 2, 1.5 * half), "−1": (half, 0.5, 3 * half), "0": (0.0, 0.5, 3 * half),
        "1": (0.0, 0.5, 3 * half), "2…4": (0.0, 0.5, 3 * half), "no switch": (0.0, 1.0, 0.0),
    }  # fmt: skip
    for key, (log_rho, low, log_prefix) in expected.items():
        got = bins[key]
        assert (got["log_token_ratio_mean"], got["min_prefix_ratio_mean"], got["log_prefix_ratio_mean"]) == \
            pytest.approx((log_rho, low, log_prefix), abs=1e-6), key  # fmt: skip
    assert (tmp_path / "plots" / "ratios_by_version_boundary.png").stat().st_size > 10_000


@pytest.mark.parametrize(("extra", "env", "message"), [
    (["train.staleness=1", "train.partial_rollout={switch_at: [4, 8]}"], {},
     r"switches 2 time\(s\) .* set train.staleness to at least the number of switches"),
    (["train.staleness=2", "train.partial_rollout={switch_at: [8, 4]}"], {}, "switch_at must be increasing"),
    (["train.staleness=2", "train.partial_rollout={switch_at: [0]}"], {}, "of at least 1"),
    (["train.staleness=1", "train.partial_rollout={switch_at: [4]}", "train.rollouts=x.parquet"], {},
     "sample online: no train.rollouts"),
    (["train.staleness=1", "train.partial_rollout={switch_at: [4]}"], {"WORLD_SIZE": "2"}, "drop --nproc"),
])  # fmt: skip
def test_partial_rollout_refusals_are_one_line(tmp_path, monkeypatch, extra, env, message):
    from test_pipeline import recipe

    from minpro_cli.errors import ConfigError
    from minpro_cli.samplers.hf import HFSampler
    from minpro_cli.train import check_partial_rollout

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=message) as caught:
        check_partial_rollout(recipe(tmp_path, *extra), HFSampler())
    assert "\n" not in str(caught.value)


def test_a_sampler_that_cannot_switch_is_refused(tmp_path):
    from test_pipeline import recipe

    from minpro_cli.errors import ConfigError
    from minpro_cli.train import check_partial_rollout

    with pytest.raises(ConfigError, match="sampler 'hf' does not .* use sampler.name=hf"):
        check_partial_rollout(recipe(tmp_path, "train.staleness=1", "train.partial_rollout={switch_at: [4]}"), object())


def test_the_sampling_weights_anchor_scores_each_token_under_its_own_version(tmp_path):
    """The trainer's rescoring of a switched response under "the weights that sampled it" uses,
    token by token, the version that drew the token: the mismatch it measures (sampler and trainer
    share weights and precision here) is float noise, not the gap between versions."""
    from test_pipeline import recipe

    from minpro_cli.train import run_train

    run_train(recipe(tmp_path, "train.staleness=2", "train.iterations=4", "train.minibatches=1",
                     "train.partial_rollout={switch_at: [3, 6]}", "train.anchor=sampling_weights",
                     "train.factor_metrics=true"))  # fmt: skip
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(m["spans"] for m in metrics) == 3
    assert max(abs(m["mismatch/kl_k1"]) for m in metrics) < 1e-5
    assert max(m["staleness/kl_k3"] for m in metrics) > 1e-4  # the versions did differ
