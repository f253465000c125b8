"""rollout → train → eval → inspect-ratios on the embedded model, in small sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import minpro_cli.train as train_module
from minpro_cli.config import load_recipe
from minpro_cli.errors import ConfigError, TrainingDivergedError
from minpro_cli.eval import run_eval
from minpro_cli.heldout import pass_at_k
from minpro_cli.inspect_ratios import inspect_ratios
from minpro_cli.logprobs import pack, response_logprobs
from minpro_cli.modeling import load_policy
from minpro_cli.objectives import Objective, ObjectiveOutput
from minpro_cli.objectives.minpro import MinPRO
from minpro_cli.rollout import run_rollout
from minpro_cli.rollouts import SCHEMA, read_rollout_rows, read_rollouts, write_rollouts
from minpro_cli.step import Trainee, training_batch, update_step
from minpro_cli.train import run_train

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
SMALL = [
    "rollout.num_prompts=4", "rollout.group_size=2", "sampler.options.max_new_tokens=40",
    "train.prompts_per_iteration=4", "train.group_size=4", "train.iterations=3", "train.checkpoint_every=1",
    "train.staleness=1", "train.minibatches=2", "optim.lr=1e-4", "optim.warmup_steps=0", "eval.n_samples=3", "eval.k=[1,3]", "eval.max_problems=5",
]


def recipe(tmp_path: Path, *extra: str):
    return load_recipe(QUICKSTART, [f"run_dir={tmp_path}", *SMALL, *extra])


def test_rollout_file_has_design_columns_and_true_behaviour_logprobs(tmp_path, policy):
    out = run_rollout(recipe(tmp_path))
    table = pq.read_table(out)
    assert set(SCHEMA.names) <= set(table.schema.names) and table.num_rows == 8
    rows = table.to_pylist()
    assert sorted((r["prompt_id"], r["sample_index"]) for r in rows)[:2] == [("arith-train-00000", 0), ("arith-train-00000", 1)]
    assert all(r["top_p"] == 1.0 and r["top_k"] == 0 and r["temperature"] == 1.0 for r in rows)
    assert all(0.0 <= r["reward"] <= 1.0 and "extracted" in json.loads(r["verifier_details"]) for r in rows)
    packed = pack([r["prompt_token_ids"] for r in rows], [r["response_token_ids"] for r in rows], policy.pad_token_id)
    with torch.no_grad():
        recomputed, _ = response_logprobs(policy.model, packed)
    for i, r in enumerate(rows):
        torch.testing.assert_close(recomputed[i, : len(r["behavior_logprobs"])], torch.tensor(r["behavior_logprobs"]),
                                   atol=1e-4, rtol=0)
    assert (tmp_path / "rollouts.config.yaml").is_file()


def test_online_loop_with_staleness_writes_everything(tmp_path):
    final = run_train(recipe(tmp_path))
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1, 2]
    for key in ("loss", "reward_mean", "entropy", "grad_norm", "clip_frac", "ratio_mean", "ratio_min",
                "min_prefix_ratio_mean", "min_prefix_ratio_min", "zero_variance_group_frac"):
        assert all(isinstance(m[key], float) for m in metrics), key
    # staleness 1: round r samples with the weights of round r−1 (two optimizer steps per round)
    versions = [read_rollouts(tmp_path / "rollouts" / f"round_{r:05d}.parquet")["policy_version"][0].as_py()
                for r in range(3)]
    assert versions == [0, 0, 2]
    assert [m["staleness_steps"] for m in metrics] == [0, 2, 2]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["round_00002", "round_00003"]
    assert (tmp_path / "config.yaml").is_file()
    plain = AutoModelForCausalLM.from_pretrained(final, use_safetensors=True)  # plain transformers loads it
    assert sum(p.numel() for p in plain.parameters()) > 500_000


def test_pipelined_sampling_gives_the_same_run_bit_for_bit(tmp_path, monkeypatch):
    """train.pipeline samples round r+1 in a thread while round r trains: with staleness 2 the
    rollouts, the metrics (but for time) and the final weights equal the sequential run's."""
    import threading

    sampled_in, real_rows = [], train_module.OnlineRounds.rows

    def rows(self, round_, *args):
        sampled_in.append((round_, threading.current_thread().name.startswith("minpro-sampler")))
        return real_rows(self, round_, *args)

    monkeypatch.setattr(train_module.OnlineRounds, "rows", rows)
    runs = {}
    for mode in ("false", "true"):
        final = run_train(recipe(tmp_path / mode, "train.staleness=2", "train.iterations=4", f"train.pipeline={mode}"))
        metrics = [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
        rollouts = [read_rollouts(tmp_path / mode / "rollouts" / f"round_{r:05d}.parquet") for r in range(4)]
        runs[mode] = (load_file(str(final / "model.safetensors")), metrics, rollouts)
    (weights, metrics, rollouts), (weights_p, metrics_p, rollouts_p) = runs["false"], runs["true"]
    assert all(torch.equal(weights[k], weights_p[k]) for k in weights)
    assert [m["policy_version"] for m in metrics_p] == [0, 0, 0, 2]
    assert [{k: v for k, v in m.items() if k != "time_s"} for m in metrics] == [
        {k: v for k, v in m.items() if k != "time_s"} for m in metrics_p
    ]
    assert all(a.equals(b) for a, b in zip(rollouts, rollouts_p))
    # sequential: every round in the main thread; pipelined: rounds 1-3 in the sampler thread
    assert sampled_in == [(r, False) for r in range(4)] + [(0, False), (1, True), (2, True), (3, True)]


def test_pipeline_needs_staleness(tmp_path):
    with pytest.raises(ConfigError, match="train.pipeline .* needs train.staleness >= 1"):
        recipe(tmp_path, "train.staleness=0", "train.pipeline=true")


SCHEDULED = ["optim.schedule=cosine", "optim.warmup_steps=2", "optim.min_lr_ratio=0.1"]


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """A cosine schedule with warm-up continues exactly where the interruption left it."""
    reference = run_train(recipe(tmp_path / "straight", *SCHEDULED))
    real_update = train_module.update_policy
    calls = {"n": 0}

    def interrupt_on_third_round(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_update(*args, **kwargs)

    monkeypatch.setattr(train_module, "update_policy", interrupt_on_third_round)
    with pytest.raises(KeyboardInterrupt):
        run_train(recipe(tmp_path / "cut", *SCHEDULED))
    assert not (tmp_path / "cut" / "final").exists()
    monkeypatch.setattr(train_module, "update_policy", real_update)
    resumed = run_train(recipe(tmp_path / "cut", *SCHEDULED))
    metrics = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1, 2]
    straight = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [m["lr"] for m in metrics] == [m["lr"] for m in straight]
    assert len({m["lr"] for m in metrics}) == 3  # the rate really changed from round to round
    a, b = load_file(str(reference / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_offline_training_on_stored_rollouts(tmp_path):
    rollouts = run_rollout(recipe(tmp_path))
    table = read_rollouts(str(rollouts))  # rewards 1, 0, 1, … so that every group carries signal
    rows = [r | {"reward": float(i % 2 == 0)} for i, r in enumerate(table.to_pylist())]
    write_rollouts(rollouts, rows, {})
    before = load_policy("embedded").model.state_dict()
    final = run_train(recipe(tmp_path / "offline", f"train.rollouts={rollouts}", "train.iterations=2",
                             "train.staleness=0"))
    after = load_file(str(final / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in after)
    assert not (tmp_path / "offline" / "rollouts").exists()  # nothing was sampled


def test_eval_reports_consistent_pass_at_k(tmp_path):
    result = run_eval(recipe(tmp_path))
    samples = read_rollouts(tmp_path / "eval" / "embedded.samples.parquet").to_pylist()
    assert result["n_problems"] == 5 and len(samples) == 15
    correct: dict[str, int] = {}
    for s in samples:
        correct[s["prompt_id"]] = correct.get(s["prompt_id"], 0) + int(s["reward"] == 1.0)
    expected = sum(pass_at_k(3, c, 3) for c in correct.values()) / 5
    assert result["pass@3"] == pytest.approx(expected)
    assert result["pass@1"] == pytest.approx(sum(s["reward"] for s in samples) / 15)
    saved = json.loads((tmp_path / "eval" / "embedded.json").read_text())
    assert saved["pass@1"] == result["pass@1"] and "config" in saved
    wrong = sum(s["reward"] == 0.0 for s in samples)  # every zero is counted under its reason
    assert sum(result["failures"].values()) == wrong


def test_inspect_ratios_on_policy_is_one_and_off_policy_is_not(tmp_path, policy):
    rollouts = run_rollout(recipe(tmp_path))
    on = inspect_ratios(str(rollouts), policy, json_path=tmp_path / "r.json")
    assert on["token_ratio"]["mean"] == pytest.approx(1.0, abs=1e-4)
    assert on["min_prefix_ratio"]["min"] == pytest.approx(1.0, abs=1e-3)
    assert on["kl_k3"] == pytest.approx(0.0, abs=1e-6)
    assert json.loads((tmp_path / "r.json").read_text())["n_tokens"] == on["n_tokens"]
    drifted = load_policy("embedded")
    with torch.no_grad():
        for p in drifted.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    off = inspect_ratios(str(rollouts), drifted)
    assert off["min_prefix_ratio"]["mean"] < on["min_prefix_ratio"]["mean"] - 0.01
    assert off["kl_k3"] > 1e-4


class NanObjective(Objective):
    def __call__(self, inputs):
        return ObjectiveOutput(loss=(inputs.logprobs * float("nan")).sum())


def test_nan_loss_stops_before_touching_the_weights(tmp_path):
    policy = load_policy("embedded")
    rows = read_rollout_rows(run_rollout(recipe(tmp_path)))
    batch = training_batch(rows, "grpo", drop_zero_variance=False)
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    with pytest.raises(TrainingDivergedError, match="loss is nan"):
        update_step(Trainee.of(policy), optimizer, NanObjective(), batch, grad_clip=1.0)
    assert all(torch.equal(before[k], v) for k, v in policy.model.state_dict().items())
    update_step(Trainee.of(policy), optimizer, MinPRO(), batch, grad_clip=1.0)  # a finite loss still trains
    assert any(not torch.equal(before[k], v) for k, v in policy.model.state_dict().items())


def test_chat_template_wraps_prompts_when_the_tokenizer_has_one(tmp_path):
    from minpro_cli.sampling import Plugins, sample_rows, sampling_job
    from minpro_cli.tasks import Problem

    policy = load_policy("embedded")
    plain = sampling_job(recipe(tmp_path), policy, Plugins.of(recipe(tmp_path)))
    assert not plain.chat  # auto: the embedded tokenizer has no template
    with pytest.raises(ConfigError, match="has no chat template"):
        sampling_job(recipe(tmp_path, "data.chat_template=always"), policy, Plugins.of(recipe(tmp_path)))
    policy.tokenizer.chat_template = (
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{% if add_generation_prompt %}[A]{% endif %}"
    )
    job = sampling_job(recipe(tmp_path, "data.system_prompt=Be brief."), policy, Plugins.of(recipe(tmp_path)))
    problem = Problem(id="x", question="Compute 2+3.", answer="5")
    assert job.chat and job.prompt(problem) == "[system]Be brief.[user]Compute 2+3.\n[A]"
    (row, *_), _ = sample_rows(job, [problem], group_size=2, seed=0)
    assert row.prompt == "[system]Be brief.[user]Compute 2+3.\n[A]"
    assert policy.tokenizer.decode(row.prompt_token_ids) == row.prompt
    off = sampling_job(recipe(tmp_path, "data.chat_template=never"), policy, Plugins.of(recipe(tmp_path)))
    assert off.prompt(problem) == "Compute 2+3.\n"


def test_several_benchmarks_in_one_recipe(tmp_path):
    gsm = tmp_path / "gsm.jsonl"
    run_dir = tmp_path / "run"  # a run directory holds minpro's files only
    gsm.write_text("".join(json.dumps({"question": f"Compute {a}+{b}.", "answer": f"so\n#### {a + b}"}) + "\n"
                           for a, b in [(2, 3), (10, 4), (7, 7)]))
    benchmarks = (f'eval.benchmarks={{arith: {{data: "embedded:arith-test", max_problems: 4}}, '
                  f'gsm: {{data: "{gsm}", preset: gsm8k, verifier: {{name: gsm8k}}, n_samples: 2}}}}')
    summary = run_eval(recipe(run_dir, benchmarks, "eval.k=[1,2]"))
    arith, gsm_result = summary["benchmarks"]["arith"], summary["benchmarks"]["gsm"]
    assert (arith["n_problems"], arith["n_samples"], arith["verifier"]) == (4, 3, "math")
    assert (gsm_result["n_problems"], gsm_result["n_samples"], gsm_result["verifier"]) == (3, 2, "gsm8k")
    for metric in ("pass@1", "pass@2", "maj@2", "pass@1_stderr"):
        assert summary["avg"][metric] == pytest.approx((arith[metric] + gsm_result[metric]) / 2)
    samples = read_rollouts(run_dir / "eval" / "embedded" / "gsm.samples.parquet").to_pylist()
    assert len(samples) == 6 and {s["verifier"] for s in samples} == {"gsm8k"}
    assert {s["reference_answer"] for s in samples} == {"5", "14"}  # 7+7: the gsm8k preset reads '#### 14'
    saved = json.loads((run_dir / "eval" / "embedded.json").read_text())
    assert saved["avg"] == summary["avg"] and set(saved["benchmarks"]) == {"arith", "gsm"}
    with pytest.raises(ConfigError, match="benchmark gsm: every k"):
        recipe(tmp_path, benchmarks, "eval.k=[1,3]")


def test_model_fingerprint_is_kept_until_a_weight_changes(monkeypatch):
    """The hash of every weight is cached; an optimizer step, an in-place write or
    load_state_dict changes it, and equal weights in another model hash equal."""
    import copy

    from minpro_cli import modeling

    policy = load_policy("embedded")
    model = policy.model
    first = modeling.model_fingerprint(model)
    hashed, sha256 = [], modeling.hashlib.sha256
    monkeypatch.setattr(modeling.hashlib, "sha256", lambda *a: hashed.append(1) or sha256(*a))
    assert modeling.model_fingerprint(model) == first and not hashed  # served from the cache
    twin = copy.deepcopy(model)
    assert modeling.model_fingerprint(twin) == first and len(hashed) == 1  # another model: hashed, equal
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.lm_head.weight.grad = torch.ones_like(model.lm_head.weight)
    optimizer.step()
    stepped = modeling.model_fingerprint(model)
    assert stepped != first
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1.0  # a one-element in-place write
    assert modeling.model_fingerprint(model) not in (first, stepped)
    model.load_state_dict(twin.state_dict())
    assert modeling.model_fingerprint(model) == first


def test_stale_weights_serve_round_r_minus_s_and_forget_what_no_round_needs():
    from minpro_cli.rounds import StaleWeights

    steps: dict[int, int] = {}  # the loop state's snapshot_steps: StaleWeights writes into it
    stale = StaleWeights(2, steps=steps)
    w = [{"w": torch.tensor(float(r))} for r in range(5)]
    assert stale.for_round(0, step=0) == (None, 0)  # nothing taken yet: the current weights, version = step
    for round_, step in ((0, 0), (1, 3), (2, 6)):  # three optimizer steps per round
        stale.take(round_, w[round_], step)
    weights, version = stale.for_round(2, step=6)  # round 2 samples with round 0's weights, taken at step 0
    assert weights is w[0] and version == 0
    weights, version = stale.for_round(1, step=3)  # round 1 − 2 < 0: the first snapshot
    assert weights is w[0] and version == 0
    stale.drop_before(3)  # round 3 samples with round 1's: round 0's goes, from both dicts
    assert sorted(stale.snapshots) == [1, 2] and steps == {1: 3, 2: 6}
    assert stale.for_round(3, step=9)[1] == 3
    assert StaleWeights(0).for_round(7, step=21) == (None, 21)  # on-policy: always the current weights
