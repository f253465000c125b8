"""`minpro sweep` and `minpro report`: real runs in subprocesses, interruption, divergence."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from minpro_cli.config import load_recipe
from minpro_cli.errors import ConfigError, MinproError
from minpro_cli.eval import run_eval
from minpro_cli.fileio import read_jsonl
from minpro_cli.report import (
    Cell,
    RunRecord,
    band,
    cells_of,
    collapse_step,
    compare,
    settings_lines,
    split_keys,
    t975,
    write_report,
)
from minpro_cli.rundir import run_name, value_label
from minpro_cli.sweep import parse_grid, plan_runs, run_sweep, sweep_plan

ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    "sampler": {"name": "hf", "options": {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 40}},
    "train": {"iterations": 3, "prompts_per_iteration": 4, "group_size": 4, "checkpoint_every": 1, "eval_every": 2},
    "optim": {"lr": 1e-4, "warmup_steps": 0},
    "eval": {"n_samples": 2, "k": [1], "max_problems": 6},
}


def sweep_recipe(tmp_path: Path, grid: dict, seeds: int = 1, **sections) -> Path:
    data = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    for key, value in {**SMALL, **sections}.items():
        data[key] = {**data.get(key, {}), **value}
    data["run_dir"] = str(tmp_path / "sweep")
    data["sweep"] = {"grid": grid, "seeds": seeds}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def cli(*args: str) -> subprocess.Popen[str]:
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # a shell that starts the suite in the background ignores SIGINT, children inherit that,
        # and the interrupt test's Ctrl-C would never arrive: a handler is reset at exec instead
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return subprocess.Popen([sys.executable, "-m", "minpro_cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def run_dirs(sweep_dir: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted((sweep_dir / "runs").iterdir())}


def test_grid_parsing_and_run_names():
    assert parse_grid(["train.staleness=0,4,8", "objective.name=grpo,minpro", "optim.lr=1e-4,3e-4"]) == {
        "train.staleness": [0, 4, 8], "objective.name": ["grpo", "minpro"], "optim.lr": [1e-4, 3e-4]}
    assert run_name({"objective.name": "grpo", "train.staleness": 4, "seed": 0}) == \
        "objective.name-grpo__train.staleness-4__seed-0"
    assert run_name({"data.train": "a/b c.jsonl"}) == "data.train-a_b_c.jsonl"
    with pytest.raises(ConfigError, match="KEY=V1,V2"):
        parse_grid(["train.staleness"])


def test_a_whole_objective_with_options_is_a_grid_value(tmp_path):
    """grid key `objective` with {name, options} values: MinPRO's two clip modes side by side."""
    ppo = {"name": "minpro", "options": {"clip_mode": "ppo"}}
    assert value_label(ppo) == "minpro:clip_mode=ppo" and value_label({"name": "grpo"}) == "grpo"
    assert run_name({"objective": ppo, "seed": 0}) == "objective-minpro_clip_mode-ppo__seed-0"
    recipe, data = sweep_plan(sweep_recipe(tmp_path, {"objective": [{"name": "grpo"}, ppo]}), [], [], None, False)
    runs = plan_runs(data, recipe, tmp_path / "sweep", "test")
    assert [r.name for r in runs] == ["objective-grpo__seed-0", "objective-minpro_clip_mode-ppo__seed-0"]
    planned = load_recipe(runs[1].directory / "recipe.yaml")
    assert planned.objective.name == "minpro" and planned.objective.options == {"clip_mode": "ppo"}
    records = [RunRecord(r.name, r.overrides, "done", [], [], None) for r in runs]
    assert [c.line for c in cells_of(records, *split_keys(recipe.sweep.grid, None))] == ["grpo", "minpro:clip_mode=ppo"]


def test_a_bad_grid_value_is_refused_before_any_run_starts(tmp_path):
    path = sweep_recipe(tmp_path, {"objective.name": ["minpro", "no_such_objective"]})
    with pytest.raises(ConfigError, match="run objective.name-no_such_objective__seed-0.*no_such_objective"):
        run_sweep(path, [], [], None, False, None, None)
    assert not (tmp_path / "sweep" / "runs" / "objective.name-minpro__seed-0" / "metrics.jsonl").exists()
    with pytest.raises(ConfigError, match="nothing to sweep"):
        run_sweep(sweep_recipe(tmp_path, {}), [], [], None, False, None, None)


def test_sweep_trains_every_grid_point_and_evaluates_held_out(tmp_path):
    """Two objectives × two seeds, two at a time; each run is an ordinary train run whose
    held-out evaluations match a standalone `minpro eval` of its final weights."""
    path = sweep_recipe(tmp_path, {"objective.name": ["minpro", "grpo"]}, seeds=2)
    proc = cli("sweep", str(path), "--jobs", "2")
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    sweep_dir = tmp_path / "sweep"
    manifest = json.loads((sweep_dir / "sweep.json").read_text())
    assert [r["overrides"] for r in manifest["runs"]] == [
        {"objective.name": o, "seed": s} for o in ("minpro", "grpo") for s in (0, 1)]
    dirs = run_dirs(sweep_dir)
    assert len(dirs) == 4
    finals = {}
    for name, run in dirs.items():
        recipe = load_recipe(run / "recipe.yaml")
        assert recipe.objective.name in name and f"seed-{recipe.seed}" in name
        assert recipe.run_dir == str(run)
        metrics = read_jsonl(run / "metrics.jsonl")
        assert [m["round"] for m in metrics] == [0, 1, 2]
        evals = read_jsonl(run / "evals.jsonl")
        assert [e["round"] for e in evals] == [0, 2, 3]  # before training, every 2 rounds, after the last
        assert [e["step"] for e in evals] == [0, metrics[1]["step"], metrics[2]["step"]]
        finals[name] = evals[-1]["eval/pass@1"]
        assert (run / "final" / "model.safetensors").is_file()
    # seeds differ: different sampled rollouts
    sampled = {n: [(m["reward_mean"], m["response_length_mean"]) for m in read_jsonl(d / "metrics.jsonl")]
               for n, d in dirs.items()}
    assert sampled["objective.name-minpro__seed-0"] != sampled["objective.name-minpro__seed-1"]
    # the last in-loop evaluation is exactly `minpro eval` of final/ (same seed, same problems)
    run = dirs["objective.name-grpo__seed-1"]
    recipe = load_recipe(run / "recipe.yaml", [f"eval.policy={run / 'final'}"])
    assert run_eval(recipe, tmp_path / "check.json")["pass@1"] == pytest.approx(finals[run.name], abs=1e-12)
    # the report was written: one summary row per objective, every seed listed, figures exist
    report = (sweep_dir / "report.md").read_text()
    assert "| all runs | minpro | 2/2 |" in report and "| all runs | grpo | 2/2 |" in report
    for name in dirs:
        seed = name.rsplit("-", 1)[1]
        objective = name.split("__")[0].split("-", 1)[1]
        assert f"| all runs | {objective} | {seed} | done | 3 |" in report
    for stem in ("heldout_pass1", "train_reward", "entropy", "grad_norm", "kl"):
        assert (sweep_dir / "report" / f"{stem}.png").stat().st_size > 10_000
        assert f"(report/{stem}.png)" in report
    # with a `minpro probe --json` file: its table (numbers from the file) and figure
    probe = ROOT / "docs" / "results" / "probe-quickstart.json"
    with_probe = write_report(sweep_dir, tmp_path / "with-probe.md", probe=probe).read_text()
    cells = {(c["staleness"], c["objective"]): c for c in json.loads(probe.read_text())["results"]}
    minpro_row = next(line for line in with_probe.splitlines() if line.startswith("| minpro |"))
    cosine = cells[8, "minpro"]["cosine"]
    assert f"{cosine['mean']:.3f} ± {cosine['se']:.3f}" in minpro_row
    assert "## Gradient probe" in with_probe and (tmp_path / "with-probe" / "probe.png").stat().st_size > 10_000


def test_interrupted_sweep_finishes_only_the_missing_runs(tmp_path):
    # a checkpoint every round: the interrupt lands with rounds still to go, not in the last one
    path = sweep_recipe(tmp_path, {"objective.name": ["minpro", "cispo"]}, train={**SMALL["train"], "iterations": 4})
    sweep_dir = tmp_path / "sweep"
    first, second = (sweep_dir / "runs" / f"objective.name-{o}__seed-0" for o in ("minpro", "cispo"))
    proc = cli("sweep", str(path), "--no-report")
    deadline = time.monotonic() + 300
    while not (second / "checkpoints" / "round_00001" / ".complete").exists():  # interrupt after its first checkpoint
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # a scheduler's stop: handled as Ctrl-C is (same path), exit 143
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in output, output
    assert len([line for line in output.splitlines() if line.startswith("interrupted by SIGTERM:")]) == 1, output
    assert "rerun the same command" in output
    assert (first / "final").is_dir() and not (second / "final").exists()
    assert "interrupted: the last complete checkpoint is" in (second / "train.log").read_text()
    first_log = (first / "train.log").read_text()
    first_metrics = (first / "metrics.jsonl").read_text()

    proc = cli("sweep", str(path))
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    assert "1 already finished" in output
    assert (first / "train.log").read_text() == first_log  # the finished run was not touched
    assert (first / "metrics.jsonl").read_text() == first_metrics
    assert "resuming from" in (second / "train.log").read_text()
    assert [m["round"] for m in read_jsonl(second / "metrics.jsonl")] == list(range(4))
    assert [e["round"] for e in read_jsonl(second / "evals.jsonl")] == [0, 2, 4]


def test_a_diverged_run_is_recorded_reported_and_not_rerun(tmp_path):
    """lr 1e25 blows the weights up in the first step: the second minibatch's loss is not finite."""
    path = sweep_recipe(tmp_path, {"optim.lr": [1e-4, 1e25]},
                        train={**SMALL["train"], "iterations": 3, "minibatches": 2, "prompts_per_iteration": 8})
    records = tmp_path / "records"
    proc = cli("sweep", str(path), "--records", str(records))
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    sweep_dir = tmp_path / "sweep"
    bad = sweep_dir / "runs" / "optim.lr-1e_25__seed-0"
    diverged = json.loads((bad / "diverged.json").read_text())
    assert diverged["round"] == 0 and diverged["step"] == 2 and ("nan" in diverged["reason"] or "inf" in diverged["reason"])
    assert "diverged (recorded, not rerun): optim.lr-1e_25__seed-0" in output
    report = (sweep_dir / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| all runs | 1e+25 | 0 |"))
    assert "| diverged |" in row and f"| {diverged['step']} |" in row
    # each finished run left its record: what the report reads, no weights
    for run in run_dirs(sweep_dir).values():
        kept = sorted(p.name for p in (records / run.name).iterdir())
        assert kept == sorted([".complete", "recipe.yaml", "evals.jsonl"]
                              + (["diverged.json"] if run == bad else ["metrics.jsonl"]))  # it diverged in round 0
        for name in kept[1:]:
            assert (records / run.name / name).read_text() == (run / name).read_text()
    # another machine (a new sweep directory) with the records: nothing trains, the report is the same
    proc = cli("sweep", str(path), "--records", str(records), "--out", str(tmp_path / "elsewhere"))
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "2 already finished" in output, output
    elsewhere = tmp_path / "elsewhere"
    assert not any((run / "train.log").exists() for run in run_dirs(elsewhere).values())
    assert "| diverged |" in next(line for line in (elsewhere / "report.md").read_text().splitlines()
                                  if line.startswith("| all runs | 1e+25 | 0 |"))
    def below_settings(text: str) -> str:  # the settings name the sweep directory
        return text[text.index("## Summary"):]

    assert below_settings((elsewhere / "report.md").read_text()) == below_settings(report)
    # a record of another recipe is refused, naming it, before anything is restored
    with pytest.raises(ConfigError, match="the record .*optim.lr-0.0001__seed-0 was made with a different recipe"):
        run_sweep(path, ["optim.warmup_steps=1"], [], None, False, None, tmp_path / "third", records)
    assert not (tmp_path / "third" / "runs" / "optim.lr-0.0001__seed-0" / "metrics.jsonl").exists()
    log = (bad / "train.log").read_text()
    proc = cli("sweep", str(path), "--no-report")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "2 already finished" in output
    assert (bad / "train.log").read_text() == log
    with pytest.raises(ConfigError, match="run optim.lr-0.0001__seed-0 finished with a different recipe"):
        run_sweep(path, ["optim.warmup_steps=1"], [], None, False, None, None)
    # a run finished before minpro had a section: the section's defaults are not a change
    good = sweep_dir / "runs" / "optim.lr-0.0001__seed-0" / "recipe.yaml"
    older = yaml.safe_load(good.read_text())
    older.pop("distributed")
    good.write_text(yaml.safe_dump(older))
    proc = cli("sweep", str(path), "--no-report")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "2 already finished" in output, output


def test_collapse_is_the_first_point_after_which_pass1_stays_below_half_its_best():
    points = [(0, 0.2), (10, 0.4), (20, 0.15), (30, 0.3), (40, 0.19), (50, 0.1)]
    assert collapse_step(points, 0.5) == 40  # 0.15 at step 20 recovers to 0.3; 0.19 < 0.2 never does
    assert collapse_step(points, 0.2) is None
    assert collapse_step([(0, 0.2), (5, 0.3)], 0.5) is None
    assert collapse_step([(0, 0.2), (5, 0.0)], 0.5) == 5


def record(name: str, heldout: list[float], **overrides) -> RunRecord:
    evals = [{"round": i, "step": 10 * i, "eval/pass@1": p} for i, p in enumerate(heldout)]
    return RunRecord(name, overrides, "done", [], evals, None)


def test_band_and_comparison_match_hand_computation():
    b = band("x", [[(0, 0.1), (10, 0.3)], [(0, 0.2), (12, 0.5)], [(0, 0.3)]])
    assert b.x == [0, 11] and b.mean == pytest.approx([0.2, 0.4]) and b.low == [0.1, 0.3] and b.high == [0.3, 0.5]
    a = Cell("p", "minpro", [record("a", [0.1, f]) for f in (0.30, 0.34, 0.32)])
    g = Cell("p", "grpo", [record("g", [0.1, f]) for f in (0.10, 0.20, 0.12)])
    diff = statistics.fmean([0.30, 0.34, 0.32]) - statistics.fmean([0.10, 0.20, 0.12])
    va, vg = statistics.variance([0.30, 0.34, 0.32]) / 3, statistics.variance([0.10, 0.20, 0.12]) / 3
    se = math.sqrt(va + vg)
    welch = (va + vg) ** 2 / (va**2 / 2 + vg**2 / 2)  # 2.56 degrees of freedom: t at 2, 4.303
    assert 2 < welch < 3
    text = compare(a, g)
    assert f"{diff:+.3f}" in text and f"{se:.3f}" in text and "unpaired, Welch" in text
    assert f"[{diff - 4.303 * se:+.3f}, {diff + 4.303 * se:+.3f}]" in text and text.endswith(": separates")
    close = Cell("p", "cispo", [record("c", [0.1, f]) for f in (0.25, 0.35, 0.31)])
    assert compare(a, close).endswith(": does not separate")


def test_lines_that_ran_the_same_seeds_are_compared_seed_by_seed():
    def cell(line: str, finals: tuple[float, ...], seeds=None) -> Cell:
        return Cell("p", line, [record(line, [0.1, f], seed=s) for s, f in zip(seeds or range(len(finals)), finals)])

    a = cell("minpro", (0.30, 0.34, 0.32))
    b = cell("cispo", (0.28, 0.33, 0.29))
    # per seed: +0.02, +0.01, +0.03 → mean +0.020, s.e. 0.010/√3 = 0.0058, where the unpaired s.e.
    # √(0.0004/3 + 0.0007/3) = 0.019; with 2 degrees of freedom t = 4.303: ±0.025, which holds 0
    text = compare(a, b)
    assert "+0.020, 95% interval [-0.005, +0.045]" in text and "0.006" in text
    assert "paired over 3 seeds, ahead in 3" in text and text.endswith(": does not separate")
    # two more seeds, both +0.02: s.e. 0.0071/√5 = 0.0032, t(4) = 2.776: ±0.009
    text = compare(cell("minpro", (0.30, 0.34, 0.32, 0.30, 0.30)), cell("cispo", (0.28, 0.33, 0.29, 0.28, 0.28)))
    assert "+0.020, 95% interval [+0.011, +0.029]" in text and text.endswith(": separates")
    shuffled = cell("cispo", (0.28, 0.33, 0.29), seeds=(0, 1, 5))
    assert "unpaired" in compare(a, shuffled) and compare(a, shuffled).endswith(": does not separate")


def test_settings_show_the_grids_values_where_it_sets_them():
    config = {"train": {"iterations": 20, "epochs": 1, "minibatches": 1, "group_size": 8}, "optim": {"lr": 1e-4}}
    swept = settings_lines({"grid": {"train.minibatches": [4, 8]}, "config": config})[2]
    assert "1 epoch(s) × 4/8 minibatch(es)" in swept and "20 rounds" in swept
    assert "× 1 minibatch(es)" in settings_lines({"grid": {"objective": ["grpo"]}, "config": config})[2]


def test_t_quantiles_match_published_tables():
    """Student's t_0.975 (e.g. NIST/SEMATECH e-Handbook table 1.3.6.7.2); past 30 degrees the expansion."""
    published = {1: 12.706, 2: 4.303, 5: 2.571, 10: 2.228, 20: 2.086, 30: 2.042, 40: 2.021, 60: 2.000, 100: 1.984}
    for dof, value in published.items():
        assert t975(dof) == pytest.approx(value, abs=1.5e-3), dof
    assert t975(2.9) == t975(2) and t975(0.4) == t975(1)  # fractional Welch degrees round down: wider


def test_report_refuses_a_directory_that_is_not_a_sweep(tmp_path):
    with pytest.raises(MinproError, match="no sweep.json"):
        write_report(tmp_path)
    (tmp_path / "sweep.json").write_text("{not json")
    with pytest.raises(MinproError, match="not a sweep manifest"):
        write_report(tmp_path)


def test_the_shipped_study_plans_84_runs_and_its_quick_version_4(tmp_path):
    recipe_path = ROOT / "recipes" / "offpolicy-sweep.yaml"
    recipe, data = sweep_plan(recipe_path, [], [], None, quick=False)
    runs = plan_runs(data, recipe, tmp_path / "full", str(recipe_path))
    objectives = {value_label(r.overrides["objective"]) for r in runs}
    assert len(runs) == 84 and objectives == {
        "grpo", "gspo", "cispo", "minpro", "minpro:clip_mode=ppo", "prefix", "m2po"}
    assert {r.overrides["train.staleness"] for r in runs} == {0, 4, 8, 16} and {r.overrides["seed"] for r in runs} == {0, 1, 2}
    ppo = load_recipe(next(r for r in runs if "ppo" in r.name).directory / "recipe.yaml")
    assert (ppo.objective.name, ppo.objective.options["clip_mode"]) == ("minpro", "ppo")
    quick, quick_data = sweep_plan(recipe_path, [], [], None, quick=True)
    assert quick.run_dir == "runs/offpolicy-sweep-quick"
    quick_runs = plan_runs(quick_data, quick, tmp_path / "quick", str(recipe_path))
    assert len(quick_runs) == 4 and {r.iterations for r in quick_runs} == {6}
    written = load_recipe(quick_runs[-1].directory / "recipe.yaml")
    assert (written.train.staleness, written.objective.name, written.eval.max_problems) == (8, "minpro", 32)
    assert written.sweep.grid == {}  # a run's recipe is an ordinary training recipe
    # the command line adds to the grid and overrides the seeds
    recipe, data = sweep_plan(recipe_path, [], ["optim.lr=1e-5,3e-5"], 1, quick=False)
    assert len(plan_runs(data, recipe, tmp_path / "more", str(recipe_path))) == 56
    # the study script's SGD cells: the grid replaced by an override
    sgd = ["optim.name=sgd", "sweep.grid={objective: [{name: cispo}, {name: minpro}], train.staleness: [0, 16]}"]
    recipe, data = sweep_plan(recipe_path, sgd, [], None, quick=False)
    sgd_runs = plan_runs(data, recipe, tmp_path / "sgd", str(recipe_path))
    assert len(sgd_runs) == 12 and load_recipe(sgd_runs[0].directory / "recipe.yaml").optim.name == "sgd"


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


def test_a_sweep_killed_by_sigkill_leaves_no_run_training_and_resumes(tmp_path):
    """No clean-up code of the sweep runs; the kernel stops its run (PR_SET_PDEATHSIG), which
    releases the run's lock, so the rerun is not refused. (SIGTERM: the test above.)"""
    path = sweep_recipe(tmp_path, {"objective.name": ["minpro"]}, train={**SMALL["train"], "iterations": 3})
    run = tmp_path / "sweep" / "runs" / "objective.name-minpro__seed-0"
    proc = cli("sweep", str(path), "--no-report")
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "round_00001" / ".complete").exists():  # an event, not a time
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    child = int((run / ".minpro-lock").read_text().split()[0])  # the lock records its holder's pid
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=120)
    deadline = time.monotonic() + 60
    while alive(child):  # the run stops within a write
        assert time.monotonic() < deadline, f"run {child} still training after its sweep was killed"
        time.sleep(0.05)
    assert "interrupted by SIGTERM: the last complete checkpoint is" in (run / "train.log").read_text()
    proc = cli("sweep", str(path), "--no-report")
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    assert [m["round"] for m in read_jsonl(run / "metrics.jsonl")] == list(range(3))  # every round once
