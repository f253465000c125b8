"""Write docs/results/mixed-versions.md: responses written by two policies, where the prefix
ratio and the token ratio part ways.

    .venv/bin/python scripts/study_mixed_versions.py [--quick]

Part A, the probe: a 24-step on-policy run of the quickstart model keeps a checkpoint per step;
`minpro probe` takes its last checkpoint as π and the ones 4 and 16 steps older as μ, and draws
behaviour samples whose responses μ starts and π continues from token K on (K = 8, 12, 24, or
no switch): each objective's gradient cosine to π's on-policy gradient g★, and the paired
differences between objectives over the draws (t-intervals). Part B, the training sweep:
`recipes/mixed-versions.yaml` (cispo, minpro, prefix × staleness 4, 16 × one switch at token 8,
or none × 3 seeds), reported by `minpro report` with paired differences against cispo.
Part C: `inspect-ratios --by version_boundary` of one partial-rollout run's last round.
Every step is cached under --work, so a rerun finishes what is missing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from study_mismatch import T975

from minpro_cli.fileio import write_text_atomic
from minpro_cli.probe_results import Cell

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "mixed-versions.yaml"
OBJECTIVES = ("grpo:loss_agg=token-mean", "cispo", "minpro", "prefix")
BOUNDARY_FIGURE = "ratios_by_version_boundary.png"
PAIRS = (("minpro", "cispo"), ("minpro", "prefix"), ("minpro", "grpo:loss_agg=token-mean"))


def minpro(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "minpro_cli", *args], check=True, cwd=ROOT)


def probe(work: Path, quick: bool) -> Path:
    """The on-policy run with a checkpoint per step, then the probe of its last checkpoint."""
    run, out = work / "probe-run", work / "probe.json"
    steps = 6 if quick else 24
    if not (run / "final" / "model.safetensors").exists():
        minpro("train", str(RECIPE), f"run_dir={run}", "train.staleness=0", f"train.iterations={steps}",
               "train.checkpoint_every=1", f"train.keep_checkpoints={steps + 1}", "train.eval_every=0")  # fmt: skip
    if not out.exists():
        size = ["--draws", "2", "--prompts", "8", "--reference-multiple", "2"] if quick else \
            ["--draws", "6", "--reference-multiple", "8"]  # fmt: skip
        minpro("probe", str(RECIPE), "--run", str(run), "--staleness", "2" if quick else "4,16",
               "--switch-at", "none,8" if quick else "none,8,12,24", *[a for o in OBJECTIVES for a in ("--objective", o)],
               *size, "--json", str(out), "--plot", str(work / "probe-plots"))  # fmt: skip
    return out


def never_last(at: int | None) -> float:
    """Switch points in order, no switch last (a switch after the response's end)."""
    return float("inf") if at is None else at


def probe_tables(path: Path) -> list[str]:
    """Each cell's cosine (mean ± s.e. over draws), and the paired differences between objectives."""
    report = json.loads(path.read_text())
    cells = [Cell.from_json(c) for c in report["results"]]
    by = {(c.staleness, c.switch_at, c.objective): c for c in cells}
    behaviours = sorted({(c.staleness, c.switch_at) for c in cells}, key=lambda b: (b[0], never_last(b[1])))
    objectives = list(dict.fromkeys(c.objective for c in cells))
    settings = (f"Probe: {report['draws']} draws, {report['prompts']} prompts × {report['group_size']} responses "
                f"per sample, g★ from {report['reference_multiple']} samples of that size; π = "
                f"`{Path(report['policy']).name}`.")  # fmt: skip
    header = "| μ (steps older than π) | switch to π at token | KL(μ‖π) per token | " + " | ".join(objectives)
    lines = [settings, "", "cos(g_obj, g★), mean ± s.e. over draws (floor: a fresh on-policy sample of the same size):",
             "", header + " | floor |", "|---|---|---|" + "---|" * (len(objectives) + 1)]  # fmt: skip
    for staleness, at in behaviours:
        row = [by[staleness, at, o].summaries for o in objectives]
        lines.append(f"| {staleness} | {'never' if at is None else at} | {row[0]['kl'].mean:.4f} | "
                     + " | ".join(f"{s['cosine'].mean:.3f} ± {s['cosine'].se:.3f}" for s in row)
                     + f" | {row[0]['floor_cosine'].mean:.3f} |")  # fmt: skip
    draws = report["draws"]
    title = (f"Paired differences of cos(g_obj, g★) over the {draws} draws (each draw's objectives share its "
             "samples), mean and 95% t-interval:")
    header = "| μ | switch at | " + " | ".join(f"{a} − {b}" for a, b in PAIRS) + " |"
    lines += ["", title, "", header, "|---|---|" + "---|" * len(PAIRS)]
    for staleness, at in behaviours:
        cells_text = []
        for a, b in PAIRS:
            diffs = [x - y for x, y in zip(by[staleness, at, a].summaries["cosine"].draws,
                                           by[staleness, at, b].summaries["cosine"].draws)]  # fmt: skip
            mean = statistics.fmean(diffs)
            half = T975[len(diffs) - 1] * statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
            verdict = "" if abs(mean) > half else " (does not separate)"
            cells_text.append(f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]{verdict}")
        lines.append(f"| {staleness} | {'never' if at is None else at} | " + " | ".join(cells_text) + " |")
    return lines


def switch_figure(path: Path, out: Path) -> None:
    """cos(g_obj, g★) against the switch point, one panel per version gap, one line per objective
    (±2 s.e. over draws); dashed, the noise floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [Cell.from_json(c) for c in json.loads(path.read_text())["results"]]
    gaps = sorted({c.staleness for c in cells})
    points = sorted({c.switch_at for c in cells}, key=never_last)
    fig, axes = plt.subplots(1, len(gaps), figsize=(5.5 * len(gaps), 4), sharey=True, squeeze=False)
    for ax, gap in zip(axes[0], gaps):
        for k, objective in enumerate(dict.fromkeys(c.objective for c in cells)):
            mine = {c.switch_at: c.summaries for c in cells if c.staleness == gap and c.objective == objective}
            mean = [mine[at]["cosine"].mean for at in points]
            se = [mine[at]["cosine"].se for at in points]
            ax.errorbar(range(len(points)), mean, yerr=[2 * e for e in se], marker="o", capsize=3, color=f"C{k}",
                        label=objective)  # fmt: skip
        ax.axhline(mine[points[0]]["floor_cosine"].mean, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(points)), ["never" if at is None else str(at) for at in points])
        ax.set(xlabel="μ's responses continue under π's weights from token", title=f"μ {gap} steps older than π")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("cos(g_obj, g★)  (±2 s.e.; dashed: noise floor)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def sweep(work: Path, quick: bool, out: Path) -> tuple[Path, Path]:
    """The sweep and its report (the recipe and the report's paths relative to the repository, as the
    report prints them)."""
    minpro("sweep", rel(RECIPE), f"run_dir={work / 'sweep'}", *(["--quick"] if quick else []))
    sweep_dir = work / ("sweep-quick" if quick else "sweep")  # --quick writes beside the full sweep
    report = out.with_name(out.stem + "-sweep.md")
    minpro("report", rel(sweep_dir), "--out", rel(report), "--line", "objective", "--reference", "cispo")
    return sweep_dir, report


def switch_effect(sweep_dir: Path) -> list[str]:
    """Final held-out pass@1 with the switch minus without it, per objective and staleness, paired
    by seed (a seed's runs share starting weights, prompts and evaluation problems)."""
    final: dict[tuple, float] = {}
    for run in json.loads((sweep_dir / "sweep.json").read_text())["runs"]:
        evals = [json.loads(line) for line in (sweep_dir / "runs" / run["name"] / "evals.jsonl").read_text().splitlines()]
        o = run["overrides"]
        final[o["objective"]["name"], o["train.staleness"], o["train.partial_rollout"] is not None, o["seed"]] = \
            evals[-1]["eval/pass@1"]  # fmt: skip
    title = ("Final held-out pass@1 with a switch at token 8 minus without, paired by seed (a seed's runs share "
             "starting weights, prompts and evaluation problems), mean and 95% t-interval:")
    lines = [title, "", "| objective | staleness | switch − never | per seed |", "|---|---|---|---|"]
    for objective, staleness in sorted({(k[0], k[1]) for k in final}, key=lambda k: (k[1], k[0])):
        seeds = sorted(k[3] for k in final if k[:3] == (objective, staleness, True))
        diffs = [final[objective, staleness, True, s] - final[objective, staleness, False, s] for s in seeds]
        mean = statistics.fmean(diffs)
        half = T975[len(diffs) - 1] * statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
        verdict = "" if abs(mean) > half else " (does not separate)"
        lines.append(f"| {objective} | {staleness} | {mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]{verdict} | "
                     + ", ".join(f"{d:+.3f}" for d in diffs) + " |")  # fmt: skip
    return lines


def rel(path: Path) -> str:
    return str(Path(path).resolve().relative_to(ROOT))


def inspect(work: Path, quick: bool, figures: Path) -> Path:
    """One partial-rollout run (staleness 16, a switch at token 8) and its last round's ratios by
    distance from the switch, against the weights that trained on that round."""
    run, steps = work / "inspect-run", 6 if quick else 20
    staleness = 2 if quick else 16
    if not (run / "final" / "model.safetensors").exists():
        minpro("train", str(RECIPE), f"run_dir={run}", "objective.name=minpro", f"train.staleness={staleness}",
               "train.partial_rollout={switch_at: [8]}", f"train.iterations={steps}", "train.checkpoint_every=1",
               "train.keep_checkpoints=2", "train.eval_every=0")  # fmt: skip
    last = steps - 1
    report = work / "inspect.json"
    if not report.exists():
        minpro("inspect-ratios", str(run / "rollouts" / f"round_{last:05d}.parquet"), "--policy",
               str(run / "checkpoints" / f"round_{last:05d}"), "--by", "version_boundary", "--json", str(report),
               "--plot", str(work / "inspect-plots"))  # fmt: skip
    figures.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(work / "inspect-plots" / BOUNDARY_FIGURE, figures / BOUNDARY_FIGURE)
    return report


def boundary_table(path: Path) -> list[str]:
    bins = json.loads(path.read_text())["version_boundary"]
    lines = ["| tokens from the switch | tokens | mean log ρ_t | mean ρ̲_t | mean log ρ_1:t |", "|---|---|---|---|---|"]
    lines += [f"| {b['bin']} | {b['count']} | {b['log_token_ratio_mean']:+.4f} | {b['min_prefix_ratio_mean']:.4f} | "
              f"{b['log_prefix_ratio_mean']:+.3f} |" for b in bins]  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke-sized (minutes), under runs/mixed-versions-quick")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or ROOT / ("runs/mixed-versions-quick" if args.quick else "runs/mixed-versions")
    out = args.out or (work / "mixed-versions.md" if args.quick else ROOT / "docs/results/mixed-versions.md")
    figures = out.with_suffix("")
    probe_json = probe(work, args.quick)
    switch_figure(probe_json, figures / "probe_by_switch.png")
    inspected = inspect(work, args.quick, figures)
    sweep_dir, sweep_report = sweep(work, args.quick, out)
    intro = ("Made by `scripts/study_mixed_versions.py` on the quickstart model (2 CPU cores). A switch at token "
             "K: μ draws tokens 0 … K−1, newer weights draw the rest, the prefix re-read under them "
             "(`train.partial_rollout`, `minpro probe --switch-at`).")
    inspected_text = ("`minpro inspect-ratios --by version_boundary` of the last round of a minpro run with "
                      "train.staleness=16 and a switch at token 8, against the weights that trained on it:")
    notes = out.with_suffix(".notes.md")  # the reading, written by hand once the numbers are in
    text = ["# Responses written by two policies: the probe, a training sweep, the ratios at the switch", "", intro,
            "", *([notes.read_text().strip(), ""] if notes.exists() else []),
            "## A. The probe", "", *probe_tables(probe_json), "",
            f"![the probe by switch point]({figures.name}/probe_by_switch.png)", "",
            "## B. The training sweep", "",
            (f"Every run, per-seed results and paired differences between objectives: [{sweep_report.name}]"
             f"({sweep_report.name})."), "", *switch_effect(sweep_dir), "",
            "## C. Ratios at the switch", "", inspected_text, "", *boundary_table(inspected), "",
            f"![ratios at the switch]({figures.name}/{BOUNDARY_FIGURE})", ""]
    for data in (probe_json, inspected):  # the numbers behind the tables, beside the page
        shutil.copyfile(data, figures / data.name)
    write_text_atomic(out, "\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
