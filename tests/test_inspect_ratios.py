"""inspect-ratios against an independent computation (pyarrow + a plain transformers forward
pass + Python loops), streaming invariance, grouping, stored target log-probs, plots, bad input."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import replace
from pathlib import Path

import matplotlib.image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from minpro_cli.config import load_recipe
from minpro_cli.errors import ConfigError, RolloutFileError
from minpro_cli.inspect_ratios import InspectOptions, inspect_ratios, target_logprobs
from minpro_cli.modeling import load_policy
from minpro_cli.plots import first_break_figure, histogram_figure, plot_run, position_figure
from minpro_cli.ratiostats import RatioStats, StepRatios
from minpro_cli.rollout import run_rollout
from minpro_cli.rollouts import SCHEMA_1, read_rollout_rows, write_rollouts
from minpro_cli.train import run_train

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
SMALL = ["rollout.num_prompts=12", "rollout.group_size=3", "sampler.options.max_new_tokens=40",
         "train.prompts_per_iteration=4", "train.group_size=4", "train.iterations=3", "train.checkpoint_every=3",
         "optim.lr=1e-3", "optim.warmup_steps=0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Rollouts sampled by the embedded model, a checkpoint trained 3 steps, and its run dir."""
    run_dir = tmp_path_factory.mktemp("run")
    recipe = load_recipe(QUICKSTART, [f"run_dir={run_dir}", *SMALL])
    rollouts = run_rollout(recipe)
    return rollouts, run_train(recipe), run_dir


def independent_log_ratios(rollouts: Path, checkpoint: Path) -> list[dict]:
    """Per row: its clamped log ρ list, from the parquet columns and one unpadded forward pass each."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, use_safetensors=True).eval()
    out = []
    for row in pq.read_table(rollouts).to_pylist():
        prompt, response = row["prompt_token_ids"], row["response_token_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1].double()
        logp = torch.log_softmax(logits / row["temperature"], -1).gather(1, torch.tensor(response)[:, None])[:, 0]
        log_rho = [max(-20.0, min(20.0, a - b)) for a, b in zip(logp.tolist(), row["behavior_logprobs"])]
        out.append({**row, "log_rho": log_rho})
    return out


def loop_quantities(log_rho: list[float]) -> dict[str, list[float]]:
    token, min_prefix, weight, prefix = [], [], [], []
    running_min, running_sum = math.inf, 0.0
    for lr in log_rho:
        lm = 0.0 if running_min == math.inf else running_min
        running_sum += lr
        token.append(math.exp(lr))
        min_prefix.append(math.exp(lm))
        weight.append(math.exp(lm + lr))
        prefix.append(math.exp(running_sum))
        running_min = min(running_min, lr)
    return {"token_ratio": token, "min_prefix_ratio": min_prefix, "minpro_weight": weight, "prefix_ratio": prefix}


def test_report_agrees_with_an_independent_computation(trained, tmp_path):
    rollouts, checkpoint, _ = trained
    report = inspect_ratios(str(rollouts), load_policy(str(checkpoint)),
                            InspectOptions(batch_size=7, eps_low=0.2, eps_high=0.2, thresholds=(0.5, 2.0), worst=3))
    rows = independent_log_ratios(rollouts, checkpoint)
    per_row = [loop_quantities(r["log_rho"]) for r in rows]
    assert report["n_sequences"] == len(rows) == 36
    for key in ("token_ratio", "min_prefix_ratio", "minpro_weight", "prefix_ratio"):
        values = [v for q in per_row for v in q[key]]
        got = report[key]
        assert got["count"] == len(values)
        assert got["mean"] == pytest.approx(statistics.mean(values), rel=1e-4)
        assert got["std"] == pytest.approx(statistics.stdev(values), rel=1e-4)
        assert got["min"] == pytest.approx(min(values), rel=1e-3)
        assert got["max"] == pytest.approx(max(values), rel=1e-3)
        # a histogram quantile is the nearest-rank value within its log-space bin (0.01 wide); an
        # interpolating quantile can sit further off where the tail's order statistics are sparse
        ordered = sorted(values)
        for name, q in (("p5", 0.05), ("p50", 0.5), ("p95", 0.95)):
            nearest_rank = ordered[max(math.ceil(q * len(values)) - 1, 0)]
            assert abs(math.log(got[name] / nearest_rank)) <= 0.0101, (key, name, got[name], nearest_rank)
        assert got["frac_below"]["0.5"] == pytest.approx(sum(v < 0.5 for v in values) / len(values), abs=2e-3)
        assert got["frac_above"]["2.0"] == pytest.approx(sum(v > 2.0 for v in values) / len(values), abs=2e-3)
        ess = sum(values) ** 2 / (len(values) * sum(v * v for v in values))
        assert report["ess"][key] == pytest.approx(ess, rel=1e-3)
    log_rho = [lr for r in rows for lr in r["log_rho"]]
    n = len(log_rho)
    assert report["kl_k1"] == pytest.approx(sum(-x for x in log_rho) / n, rel=1e-3, abs=1e-6)
    assert report["kl_k3"] == pytest.approx(sum(math.exp(x) - 1 - x for x in log_rho) / n, rel=1e-3)
    assert report["m2"] == pytest.approx(sum(x * x for x in log_rho) / n, rel=1e-3)
    assert report["clip"]["token_ratio"]["high"] == pytest.approx(sum(x > math.log(1.2) for x in log_rho) / n,
                                                                   abs=2e-3)
    assert report["clip"]["token_ratio"]["low"] == pytest.approx(sum(x < math.log(0.8) for x in log_rho) / n,
                                                                  abs=2e-3)
    ends = [q["prefix_ratio"][-1] for q in per_row]
    assert report["ess"]["sequence"] == pytest.approx(sum(ends) ** 2 / (len(ends) * sum(e * e for e in ends)), rel=1e-3)
    # by position: 1-based positions 4–7 (0-based 3..6)
    bin_4_7 = next(b for b in report["by_position"]["absolute"] if b["bin"] == "4–7")
    in_bin = [(r["log_rho"][t], q) for r, q in zip(rows, per_row) for t in range(3, min(7, len(r["log_rho"])))]
    assert bin_4_7["count"] == len(in_bin)
    assert bin_4_7["log_token_ratio_mean"] == pytest.approx(statistics.mean(x for x, _ in in_bin), abs=1e-4)
    # first break below 0.5
    firsts = [next((t + 1 for t, m in enumerate(q["min_prefix_ratio"]) if m < 0.5), None) for q in per_row]
    broken = [f for f in firsts if f is not None]
    assert broken, "the trained checkpoint should have drifted far enough to break some prefixes"
    assert report["first_break"]["0.5"]["fraction_broken"] == pytest.approx(len(broken) / len(rows))
    assert report["first_break"]["0.5"]["mean_position"] == pytest.approx(statistics.mean(broken))
    # the worst sequence: smallest ρ̲ at the end, i.e. smallest token ratio of the response
    worst_row = min(rows, key=lambda r: min(r["log_rho"]))
    worst_value = min(worst_row["log_rho"])
    top = report["worst"][0]
    assert top["min_ratio"] == pytest.approx(math.exp(worst_value), rel=1e-3)
    assert (top["prompt_id"], top["sample_index"]) == (worst_row["prompt_id"], worst_row["sample_index"])
    assert top["token_id"] == worst_row["response_token_ids"][top["position"] - 1]
    assert isinstance(top["token"], str) and len(report["worst"]) == 3


def test_rollouts_scored_by_their_own_sampler_give_ratio_one(trained, policy):
    rollouts, _, _ = trained
    report = inspect_ratios(str(rollouts), policy)
    for key in ("token_ratio", "min_prefix_ratio", "minpro_weight", "prefix_ratio"):
        assert report[key]["min"] == pytest.approx(1.0, abs=2e-3), key
        assert report[key]["max"] == pytest.approx(1.0, abs=2e-3), key
    assert report["kl_k3"] == pytest.approx(0.0, abs=1e-6)
    assert report["first_break"]["0.5"]["fraction_broken"] == 0.0
    assert report["ess"]["sequence"] == pytest.approx(1.0, abs=1e-4)


def test_batch_size_does_not_change_the_report(trained):
    rollouts, checkpoint, _ = trained
    policy = load_policy(str(checkpoint))
    small = inspect_ratios(str(rollouts), policy, InspectOptions(batch_size=2))
    large = inspect_ratios(str(rollouts), policy, InspectOptions(batch_size=64))
    for key in ("token_ratio", "prefix_ratio"):
        for stat in ("count", "mean", "std", "p1", "p50", "p99", "min", "max"):
            assert small[key][stat] == pytest.approx(large[key][stat], rel=1e-5)
    assert small["first_break"] == large["first_break"]
    assert [w["prompt_id"] for w in small["worst"]] == [w["prompt_id"] for w in large["worst"]]


def test_stored_target_logprobs_replace_the_forward_pass(trained, tmp_path):
    rollouts, checkpoint, _ = trained
    policy = load_policy(str(checkpoint))
    rows = read_rollout_rows(rollouts)
    target = target_logprobs(policy, rows)
    scored = [replace(r, target_logprobs=target[i, : len(r.response_token_ids)].tolist()) for i, r in enumerate(rows)]
    write_rollouts(tmp_path / "scored.parquet", scored, {})
    stored = inspect_ratios(str(tmp_path / "scored.parquet"), None)
    forward = inspect_ratios(str(rollouts), policy)
    for key in ("token_ratio", "minpro_weight"):
        assert stored[key]["mean"] == pytest.approx(forward[key]["mean"], rel=1e-6)
    assert stored["n_tokens"] == forward["n_tokens"]
    with pytest.raises(RolloutFileError, match=r"rollouts\.parquet: no 'target_logprobs' column.*--policy"):
        inspect_ratios(str(rollouts), None)


def test_groups_by_policy_version_partition_the_rows(trained):
    _, checkpoint, run_dir = trained  # the run's own round files hold versions 0, 1, 2
    policy = load_policy(str(checkpoint))
    report = inspect_ratios(str(run_dir / "rollouts"), policy, InspectOptions(by="policy_version"))
    groups = report["groups"]
    assert report["by"] == "policy_version"
    assert sorted(groups) == ["0", "1", "2"]
    assert sum(g["n_tokens"] for g in groups.values()) == report["n_tokens"]
    alone = inspect_ratios(str(run_dir / "rollouts" / "round_00001.parquet"), policy)
    assert groups["1"]["token_ratio"]["mean"] == pytest.approx(alone["token_ratio"]["mean"], rel=1e-9)
    staleness = inspect_ratios(str(run_dir / "rollouts"), policy, InspectOptions(by="staleness", policy_step=3))
    assert sorted(staleness["groups"]) == ["1", "2", "3"]


def test_plots_have_labelled_axes_and_open(trained, tmp_path):
    rollouts, checkpoint, _ = trained
    stats = RatioStats()
    report = inspect_ratios(str(rollouts), load_policy(str(checkpoint)), plot_dir=tmp_path / "plots")
    for png in ("ratio_histograms.png", "ratios_by_position.png", "first_break.png"):
        image = matplotlib.image.imread(tmp_path / "plots" / png)
        assert image.shape[0] > 200 and image.shape[1] > 300
    stats.add(torch.tensor([[0.1, -2.0, 0.3]], dtype=torch.float64), torch.tensor([[True, True, True]]))
    for fig in (histogram_figure(stats), position_figure(report), first_break_figure(report)):
        for ax in fig.axes:
            assert ax.get_xlabel() and ax.get_ylabel()


def test_training_logs_ratio_statistics_and_plots_them(trained):
    _, _, run_dir = trained
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for key in ("ratios/token_ratio_mean", "ratios/min_prefix_ratio_p5", "ratios/prefix_ratio_max", "ratios/kl_k3",
                "ratios/m2", "ratios/ess_sequence"):
        assert all(math.isfinite(m[key]) for m in metrics), key
    assert metrics[0]["ratios/token_ratio_max"] == pytest.approx(1.0, abs=2e-3)  # first step is on-policy
    image = matplotlib.image.imread(plot_run(run_dir))
    assert image.shape[1] > 600


def test_bad_inputs_name_the_file_and_row(trained, tmp_path, policy):
    rollouts, _, _ = trained
    with pytest.raises(RolloutFileError, match="rollout file not found"):
        inspect_ratios(str(tmp_path / "nothing-*.parquet"), policy)
    rows = pq.read_table(rollouts).to_pylist()
    foreign = [r | {"tokenizer_fingerprint": "0123abcd"} for r in rows]
    write_rollouts(tmp_path / "foreign.parquet", foreign, {})
    with pytest.raises(RolloutFileError, match=r"foreign\.parquet: rows were tokenized with tokenizer 0123abcd"):
        inspect_ratios(str(tmp_path / "foreign.parquet"), policy)
    ragged = [dict(r) for r in rows]
    ragged[20]["behavior_logprobs"] = ragged[20]["behavior_logprobs"][:-1]
    table = pa.Table.from_pylist(ragged, schema=SCHEMA_1).replace_schema_metadata({b"minpro.schema_version": b"1"})
    pq.write_table(table, tmp_path / "ragged.parquet")
    with pytest.raises(RolloutFileError, match=r"ragged\.parquet: row 20 .* behavior_logprobs for"):
        inspect_ratios(str(tmp_path / "ragged.parquet"), policy, InspectOptions(batch_size=8))
    with pytest.raises(ConfigError, match="--policy-step"):
        inspect_ratios(str(rollouts), policy, InspectOptions(by="staleness"))
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(RolloutFileError, match=r"corrupt\.parquet: not a readable parquet file"):
        inspect_ratios(str(tmp_path / "corrupt.parquet"), policy)


def test_cli_writes_json_with_the_documented_keys(trained, tmp_path):
    from test_cli import assert_one_line_error, invoke

    rollouts, checkpoint, _ = trained
    out = tmp_path / "report.json"
    result = invoke("inspect-ratios", str(rollouts), "--policy", str(checkpoint), "--threshold", "0.25",
                    "--threshold", "4", "--eps-high", "0.28", "--json", str(out), "--by", "staleness")
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    for key in ("token_ratio", "min_prefix_ratio", "minpro_weight", "prefix_ratio", "n_sequences", "n_tokens",
                "kl_k1", "kl_k3", "ess", "by_position", "first_break", "worst"):
        assert key in report, key
    assert set(report["token_ratio"]["frac_below"]) == {"0.25", "4.0"} and list(report["first_break"]) == ["0.25"]
    assert report["clip"]["eps_high"] == 0.28
    assert list(report["groups"]) == ["3"]  # step 3 read from final/trainer_state.json
    assert_one_line_error(invoke("inspect-ratios", str(rollouts), "--policy", str(checkpoint), "--by", "round"),
                          "--by must be policy_version, staleness, position or version_boundary")


def test_quantiles_resolve_near_one_and_far_from_it():
    """Near-on-policy noise (|log ρ| ~ 1e-3) is read at 1e-4; wide spreads at 1% relative."""
    gen = torch.Generator().manual_seed(0)
    for scale, rel in [(1e-3, 2e-4), (2.0, 2e-2)]:
        log_rho = scale * torch.randn(40, 50, generator=gen, dtype=torch.float64)
        stats = RatioStats()
        for chunk in log_rho.split(7):  # streamed in uneven batches
            stats.add(chunk, torch.ones_like(chunk, dtype=torch.bool))
        exact = torch.quantile(log_rho.flatten().exp(), torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))
        report = stats.report()["token_ratio"]
        for name, value in zip(("p5", "p50", "p95"), exact.tolist()):
            assert report[name] == pytest.approx(value, rel=rel), (scale, name)


def test_step_ratio_statistics_by_hand():
    """Two micro-batches of one step: ρ = (2, 0.25, 1) and (0.6). ρ̲ = (1, 2, 0.25) and (1);
    sequence weights ρ_1:|o| = 0.5 and 0.6."""
    stats = StepRatios()
    f64 = {"dtype": torch.float64}
    stats.add(torch.tensor([[math.log(2.0), math.log(0.25), 0.0]], **f64), torch.tensor([[True, True, True]]))
    stats.add(torch.tensor([[math.log(0.6), 7.0]], **f64), torch.tensor([[True, False]]))  # 7.0 is padding
    out = {k: float(v) for k, v in stats.tensors().items()}
    logs = [math.log(2), math.log(0.25), 0.0, math.log(0.6)]
    assert out["ratios/token_ratio_mean"] == pytest.approx((2 + 0.25 + 1 + 0.6) / 4)
    assert (out["ratios/token_ratio_min"], out["ratios/token_ratio_max"]) == pytest.approx((0.25, 2.0))
    assert out["ratios/token_ratio_below_0.5_frac"] == 0.25
    # p50 interpolates halfway between the 2nd and 3rd smallest log ρ: log 0.6 and 0
    assert out["ratios/token_ratio_p50"] == pytest.approx(math.sqrt(0.6))
    assert out["ratios/min_prefix_ratio_mean"] == pytest.approx((1 + 2 + 0.25 + 1) / 4)
    # ρ̲·ρ = (1·2, 2·0.25, 0.25·1) and (1·0.6)
    assert out["ratios/minpro_weight_mean"] == pytest.approx((2 + 0.5 + 0.25 + 0.6) / 4)
    assert out["ratios/minpro_weight_min"] == pytest.approx(0.25)
    assert out["ratios/kl_k1"] == pytest.approx(-sum(logs) / 4)
    assert out["ratios/m2"] == pytest.approx(sum(x * x for x in logs) / 4)
    assert out["ratios/ess_sequence"] == pytest.approx(((0.5 + 0.6) / 2) ** 2 / ((0.25 + 0.36) / 2))
    assert StepRatios().tensors() == {}


def test_cli_takes_an_unquoted_glob_reads_eps_from_the_recipe_and_writes_json_to_stdout(trained):
    from test_cli import invoke

    _, checkpoint, run_dir = trained
    files = sorted(str(p) for p in (run_dir / "rollouts").glob("round_*.parquet"))  # what the shell passes
    result = invoke("inspect-ratios", *files, "--policy", str(checkpoint), "--json", "-")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # stdout holds the JSON alone; tables and notes go to stderr
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    assert len(files) == 3 and report["n_sequences"] == rows
    # the quickstart objective's ε (minpro: eps_low 1.0, eps_high 0.2), as training counts its clip fractions
    assert (report["clip"]["eps_low"], report["clip"]["eps_high"]) == (1.0, 0.2)
    assert "clip range from the rollouts' recipe: objective 'minpro'" in result.stderr
    given = invoke("inspect-ratios", files[0], "--policy", str(checkpoint), "--eps-low", "0.3", "--eps-high", "0.4",
                   "--json", "-")
    assert given.exit_code == 0, given.output
    clip = json.loads(given.stdout)["clip"]
    assert (clip["eps_low"], clip["eps_high"]) == (0.3, 0.4)


def test_training_plot_reads_ratios_near_one_without_an_offset(trained):
    _, _, run_dir = trained
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    from minpro_cli.plots import training_figure

    figure = training_figure(metrics, "t")
    assert all(ax.yaxis.get_major_formatter().get_useOffset() is False for ax in figure.axes)


def test_an_anchor_splits_the_ratio_into_mismatch_and_drift(trained, policy):
    """Anchor = the sampling weights: the mismatch is ≡ 1 (float32 sampler) and the drift is
    the whole ratio; anchor = the trained policy: the other way round. The factors multiply
    to the ratio, token by token, so their by-position sums add up."""
    rollouts, checkpoint, _ = trained
    trained_policy = load_policy(str(checkpoint))
    at_sampling = inspect_ratios(str(rollouts), trained_policy, anchor=policy)
    at_current = inspect_ratios(str(rollouts), trained_policy, anchor=trained_policy)
    whole = at_sampling["token_ratio"]["mean"]
    assert abs(whole - 1) > 1e-3, "the checkpoint did not move: the split tests nothing"
    assert at_sampling["factors"]["mismatch"]["token_ratio"]["max"] == pytest.approx(1, abs=1e-4)
    assert at_sampling["factors"]["drift"]["token_ratio"]["mean"] == pytest.approx(whole, rel=1e-4)
    assert at_current["factors"]["drift"]["token_ratio"]["max"] == pytest.approx(1, abs=1e-9)
    assert at_current["factors"]["mismatch"]["token_ratio"]["mean"] == pytest.approx(whole, rel=1e-9)
    for b, m, d in zip(at_sampling["by_position"]["absolute"], *(at_sampling["factors"][f]["by_position"]["absolute"]
                                                                 for f in ("mismatch", "drift"))):  # fmt: skip
        assert b["log_token_ratio_mean"] == pytest.approx(m["log_token_ratio_mean"] + d["log_token_ratio_mean"],
                                                          abs=1e-9)
