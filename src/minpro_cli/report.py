"""`minpro report SWEEP_DIR`: figures, tables and a mechanical reading of a `minpro sweep`.

Lines compare one grid key (the objective, when it is swept); panels are the other grid
points (e.g. staleness); seeds are pooled into a mean with a min–max band. Every seed of
every run is listed, finished or not; a diverged run stays in, with its divergence step.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minpro_cli.console import console
from minpro_cli.errors import MinproError
from minpro_cli.fileio import read_jsonl, write_text_atomic
from minpro_cli.plots import Band, save, sweep_figure
from minpro_cli.rundir import DIVERGED_FILE, SWEEP_MANIFEST, RunStatus, run_status, value_label


@dataclass
class RunRecord:
    name: str
    overrides: dict[str, Any]
    status: RunStatus
    metrics: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    diverged: dict[str, Any] | None
    collapse_step: int | None = field(default=None)

    def heldout(self) -> list[tuple[int, float]]:
        return [(e["step"], heldout_pass1(e)) for e in self.evals]


def heldout_pass1(evaluation: dict[str, Any]) -> float:
    """pass@1 of the single eval benchmark, or the mean over the recipe's named benchmarks."""
    if "eval/pass@1" in evaluation:
        return float(evaluation["eval/pass@1"])
    values = [v for k, v in evaluation.items() if k.startswith("eval/") and k.endswith("/pass@1")]
    return sum(values) / len(values) if values else math.nan


def collapse_step(points: list[tuple[int, float]], fraction: float) -> int | None:
    """First evaluation after which held-out pass@1 stays below `fraction` × its best earlier value."""
    for i in range(1, len(points)):
        if all(points[j][1] < fraction * max(p for _, p in points[: j + 1]) for j in range(i, len(points))):
            return points[i][0]
    return None


def read_jsonl_or_fail(path: Path) -> list[dict[str, Any]]:
    return read_jsonl(path, "round") if path.exists() else []


def load_runs(sweep_dir: Path, fraction: float) -> tuple[dict[str, Any], list[RunRecord]]:
    manifest_path = sweep_dir / SWEEP_MANIFEST
    if not manifest_path.is_file():
        raise MinproError(f"{sweep_dir} has no {SWEEP_MANIFEST}: point `minpro report` at a directory `minpro sweep` wrote")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        entries = [(r["name"], r["overrides"]) for r in manifest["runs"]]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise MinproError(f"{manifest_path}: not a sweep manifest ({exc!r}); rerun `minpro sweep` to rewrite it") from None
    records = []
    for name, overrides in entries:
        directory = sweep_dir / "runs" / name
        diverged_path = directory / DIVERGED_FILE
        record = RunRecord(
            name, overrides, run_status(directory),
            read_jsonl_or_fail(directory / "metrics.jsonl"), read_jsonl_or_fail(directory / "evals.jsonl"),
            json.loads(diverged_path.read_text(encoding="utf-8")) if diverged_path.exists() else None,
        )
        record.collapse_step = collapse_step(record.heldout(), fraction)
        if record.diverged and record.collapse_step is None:
            record.collapse_step = int(record.diverged["step"])
        records.append(record)
    return manifest, records


def split_keys(grid: dict[str, list[Any]], line_key: str | None) -> tuple[str, list[str]]:
    line = line_key or next((k for k in ("objective.name", "objective") if k in grid), next(iter(grid)))
    if line not in grid:
        raise MinproError(f"--line {line}: not a swept key; the grid has {', '.join(grid)}")
    return line, [k for k in grid if k != line]


def panel_label(overrides: dict[str, Any], panel_keys: list[str]) -> str:
    return ", ".join(f"{key.rsplit('.', 1)[-1]}={value_label(overrides[key])}" for key in panel_keys) or "all runs"


def band(label: str, series: list[list[tuple[float, float]]]) -> Band:
    """Seeds aligned by index (same schedule); a seed that stopped early drops out of later points."""
    x, mean, low, high = [], [], [], []
    for i in range(max((len(s) for s in series), default=0)):
        points = [s[i] for s in series if i < len(s) and math.isfinite(s[i][1])]
        if points:
            x.append(statistics.fmean(p[0] for p in points))
            values = [p[1] for p in points]
            mean.append(statistics.fmean(values))
            low.append(min(values))
            high.append(max(values))
    return Band(label, x, mean, low, high)


def metric_series(key: str):
    def series(run: RunRecord) -> list[tuple[float, float]]:
        return [(m["step"], float(m.get(key, math.nan))) for m in run.metrics if "step" in m]
    return series


FIGURES = [  # file stem, y label, per-run series
    ("heldout_pass1", "held-out pass@1", lambda run: run.heldout()),
    ("train_reward", "training reward (mean per round)", metric_series("reward_mean")),
    ("entropy", "policy entropy (nats / token)", metric_series("entropy")),
    ("grad_norm", "gradient norm (before clipping)", metric_series("grad_norm")),
    ("min_prefix_ratio", "mean ρ̲_t (min prefix ratio)", metric_series("ratios/min_prefix_ratio_mean")),
    ("clip_frac", "fraction of tokens clipped", metric_series("clip_frac")),
    ("kl", "KL(μ‖π_θ) per token (k3)", metric_series("ratios/kl_k3")),
]


def mean_std(values: list[float]) -> str:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "–"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {spread:.3f}"


def best(run: RunRecord) -> tuple[int, float] | None:
    points = [p for p in run.heldout() if math.isfinite(p[1])]
    return max(points, key=lambda p: p[1]) if points else None


def final(run: RunRecord) -> float:
    points = run.heldout()
    return points[-1][1] if points else math.nan


@dataclass
class Cell:
    """The runs of one (panel, line) pair: all seeds."""

    panel: str
    line: str
    runs: list[RunRecord]

    def finals(self) -> list[float]:
        """Final held-out pass@1 of the seeds that have one."""
        return [f for f in map(final, self.runs) if math.isfinite(f)]

    def summary_row(self) -> list[str]:
        collapsed = [r.collapse_step for r in self.runs if r.collapse_step is not None]
        entropy = [max((m.get("entropy", math.nan) for m in r.metrics), default=math.nan) for r in self.runs]
        return [
            self.panel, self.line, f"{sum(r.status == 'done' for r in self.runs)}/{len(self.runs)}",
            mean_std([r.heldout()[0][1] if r.evals else math.nan for r in self.runs]),
            mean_std([b[1] for r in self.runs if (b := best(r))]),
            mean_std(self.finals()),
            f"{len(collapsed)}/{len(self.runs)}" + (f" (step {statistics.fmean(collapsed):.0f})" if collapsed else ""),
            f"{sum(r.status == 'diverged' for r in self.runs)}",
            mean_std(entropy),
        ]


def cells_of(records: list[RunRecord], line: str, panel_keys: list[str]) -> list[Cell]:
    """One cell per (panel, line), panel-major, each in the grid's order."""
    cells: dict[tuple[str, str], Cell] = {}
    for r in records:
        key = (panel_label(r.overrides, panel_keys), value_label(r.overrides[line]))
        cells.setdefault(key, Cell(*key, [])).runs.append(r)
    panels = list(dict.fromkeys(panel for panel, _ in cells))
    return sorted(cells.values(), key=lambda c: panels.index(c.panel))


# t_0.975 by degrees of freedom: the half-width of a 95% interval in standard errors
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
        29: 2.045, 30: 2.042}  # fmt: skip


def t975(dof: float) -> float:
    """t_0.975 at `dof` rounded down (a wider interval, never a narrower one); past 30, the
    Cornish–Fisher expansion around the normal quantile (within 1e-3)."""
    whole = max(1, math.floor(dof))
    if whole in T975:
        return T975[whole]
    z = 1.959964
    return z + (z**3 + z) / (4 * whole) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * whole**2)


def compare(a: Cell, b: Cell) -> str:
    """Difference of final held-out pass@1 (a − b) with its 95% t-interval. When both lines ran the
    same seeds the difference is paired by seed (runs of one seed share the starting weights and
    the sampling and evaluation seeds, so their noise partly cancels); otherwise Welch's interval."""
    fa, fb = a.finals(), b.finals()
    if len(fa) < 2 or len(fb) < 2:
        return f"{a.line} vs {b.line}: too few finished seeds to compare"
    sa, sb = seed_finals(a), seed_finals(b)
    if sa is not None and sb is not None and sa.keys() == sb.keys():
        diffs = [sa[seed] - sb[seed] for seed in sa]
        diff, stderr = statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))
        dof: float = len(diffs) - 1
        how = f"paired over {len(diffs)} seeds, ahead in {sum(d > 0 for d in diffs)}"
    else:
        va, vb = statistics.variance(fa) / len(fa), statistics.variance(fb) / len(fb)
        diff, stderr = statistics.fmean(fa) - statistics.fmean(fb), math.sqrt(va + vb)
        # Welch–Satterthwaite; two lines that never vary have no spread to estimate: one degree
        dof = (va + vb) ** 2 / (va**2 / (len(fa) - 1) + vb**2 / (len(fb) - 1)) if va + vb > 0 else 1
        how = "unpaired, Welch"
    half = t975(dof) * stderr
    verdict = "separates" if abs(diff) > half else "does not separate"
    return (f"{a.line} − {b.line}: {diff:+.3f}, 95% interval [{diff - half:+.3f}, {diff + half:+.3f}] "
            f"(standard error {stderr:.3f}, {how}): {verdict}")


def seed_finals(cell: Cell) -> dict[Any, float] | None:
    """Final held-out pass@1 by seed; None when the runs' seeds are not all known and distinct."""
    seeds = [r.overrides.get("seed") for r in cell.runs]
    if None in seeds or len(set(seeds)) < len(seeds):
        return None
    return {seed: f for seed, r in zip(seeds, cell.runs) if math.isfinite(f := final(r))}


def reading(cells: list[Cell], reference: str) -> list[str]:
    """Per panel: the ranking by final held-out pass@1, the reference against each other line,
    and who collapsed: generated from the numbers, so a rerun cannot disagree with its text."""
    lines = []
    for panel in dict.fromkeys(c.panel for c in cells):
        row = [c for c in cells if c.panel == panel]
        ranked = sorted(row, key=lambda c: -statistics.fmean(c.finals() or [0]))
        lines.append(f"- **{panel}**: final held-out pass@1, best first: "
                     + ", ".join(f"{c.line} {mean_std(c.finals())}" for c in ranked) + ".")
        ref = next((c for c in row if c.line == reference), None)
        if ref is not None:
            lines.extend(f"  - {compare(ref, other)}" for other in row if other is not ref)
        collapsed = [f"{c.line} {sum(r.collapse_step is not None for r in c.runs)}/{len(c.runs)}"
                     for c in row if any(r.collapse_step is not None for r in c.runs)]
        lines.append("  - collapsed: " + (", ".join(collapsed) if collapsed else "no run"))
    return lines


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def seed_rows(cells: list[Cell]) -> list[list[str]]:
    rows = []
    for cell in cells:
        for r in cell.runs:
            b = best(r)
            rows.append([
                cell.panel, cell.line, str(r.overrides.get("seed", "")), r.status, f"{len(r.metrics)}",
                f"{r.heldout()[0][1]:.3f}" if r.evals else "–",
                f"{b[1]:.3f} (step {b[0]})" if b else "–", f"{final(r):.3f}" if r.evals else "–",
                str(r.collapse_step) if r.collapse_step is not None else "–",
                f"step {r.diverged['step']}: {r.diverged['reason']}" if r.diverged else "",
            ])
    return rows


def optimizer_text(optim: dict[str, Any] | None) -> str:
    optim = optim or {}
    if optim.get("name") == "sgd":
        return f"SGD lr {optim.get('lr')}, momentum {optim.get('momentum')}"
    return f"AdamW lr {optim.get('lr')}, betas {optim.get('betas')}, eps {optim.get('eps')}"


def settings_lines(manifest: dict[str, Any]) -> list[str]:
    c, grid = manifest.get("config", {}), manifest["grid"]

    def get(*keys: str) -> Any:  # a setting the grid varies shows the grid's values, not the recipe's
        key = ".".join(keys)
        return "/".join(value_label(x) for x in grid[key]) if key in grid else _dig(c, keys)

    return [
        (f"- recipe: `{manifest.get('recipe')}`{' with `--quick`' if manifest.get('quick') else ''}; "
        f"grid: {', '.join(f'`{k}` ∈ {[value_label(x) for x in v]}' for k, v in manifest['grid'].items())}; "
        f"seeds: {manifest.get('seeds')}"),
        (f"- model `{get('model', 'path')}`, training data `{get('data', 'train')}`, held-out data `{get('data', 'eval')}` "
        f"(first {get('eval', 'max_problems')} problems × {get('eval', 'n_samples')} samples every "
        f"{get('train', 'eval_every')} rounds)"),
        (f"- {get('train', 'iterations')} rounds × {get('train', 'prompts_per_iteration')} prompts × "
        f"{get('train', 'group_size')} responses; {get('train', 'epochs')} epoch(s) × {get('train', 'minibatches')} "
        f"minibatch(es) per round; {optimizer_text(get('optim'))}, warm-up {get('optim', 'warmup_steps')} steps, "
        f"grad clip {get('optim', 'grad_clip')}; max {get('sampler', 'options', 'max_new_tokens')} new tokens"),
    ]


def _dig(data: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        data = data.get(key, {}) if isinstance(data, dict) else {}
    return data if data != {} else "?"


def probe_section(path: Path, figures_dir: Path, out: Path) -> list[str]:
    """`minpro probe --json` results: cos(g_obj, g★) per objective and behaviour, with the KL of
    each behaviour and the noise floor, and the probe's figure."""
    from minpro_cli.plots import probe_figure
    from minpro_cli.probe_results import Cell as ProbeCell

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        cells = [ProbeCell.from_json(c) for c in data["results"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MinproError(f"--probe {path}: not a `minpro probe --json` file ({exc!r})") from None
    behaviors = list(dict.fromkeys(c.behavior for c in cells))
    by = {(c.behavior, c.objective): c.summaries for c in cells}

    def cell(s: Any) -> str:
        return f"{s.mean:.3f} ± {s.se:.3f}"

    objectives = list(dict.fromkeys(c.objective for c in cells))
    rows = [["KL(μ‖π) per token", *(f"{round(by[b, objectives[0]]['kl'].mean, 4) + 0.0:.4f}" for b in behaviors)]]
    rows += [[o, *(cell(by[b, o]["cosine"]) for b in behaviors)] for o in objectives]
    floors: dict[str, list[str]] = {}  # the same for every behaviour: one fresh on-policy sample per draw
    for o in objectives:
        floors.setdefault(cell(by[behaviors[0], o]["floor_cosine"]), []).append(o)
    figure = save(probe_figure(cells), figures_dir / "probe.png")
    return ["## Gradient probe", "",
            (f"`minpro probe` of `{data.get('policy')}`: cos(g_obj, g★), mean ± s.e. over {data.get('draws')} draws of "
             f"{data.get('prompts')} prompts × {data.get('group_size')} responses; g★ from "
             f"{data.get('reference_multiple')} times as many fresh on-policy samples (docs/probe.md)."),
            "", *table(["", *behaviors], rows), "",
            "Noise floor (a fresh on-policy sample as large as μ's): "
            + "; ".join(f"{value} ({', '.join(names)})" for value, names in floors.items()) + ".",
            "", f"![gradient probe]({os.path.relpath(figure, out.parent)})", ""]


def write_report(sweep_dir: Path, out: Path | None = None, line_key: str | None = None,
                 reference: str = "minpro", collapse_fraction: float = 0.5, notes: Path | None = None,
                 probe: Path | None = None) -> Path:
    if notes is not None and not notes.is_file():
        raise MinproError(f"--notes {notes}: file not found")
    manifest, records = load_runs(sweep_dir, collapse_fraction)
    line, panel_keys = split_keys(manifest["grid"], line_key)
    out = out or sweep_dir / "report.md"
    figures_dir = out.with_suffix("")
    cells = cells_of(records, line, panel_keys)
    panels = list(dict.fromkeys(c.panel for c in cells))
    md = [f"# Sweep report: {sweep_dir.name}", "",
          (f"Written by `minpro report {sweep_dir}`. Lines: `{line}`; panels: "
          f"{', '.join(f'`{k}`' for k in panel_keys) or 'none'}; each line is the mean over seeds, the band their "
          f"min–max. A run *collapsed* at the first evaluation after which its held-out pass@1 stays below "
          f"{collapse_fraction:g} × its best earlier value; a diverged run (non-finite loss) collapsed where it stopped."),
          "", "## Settings", "", *settings_lines(manifest), ""]
    md += ["## Figures", ""]
    for stem, ylabel, series in FIGURES:
        by_panel = {p: [band(c.line, [series(r) for r in c.runs]) for c in cells if c.panel == p] for p in panels}
        if not any(b.x for bands in by_panel.values() for b in bands):
            continue
        path = save(sweep_figure(by_panel, ylabel), figures_dir / f"{stem}.png")
        md += [f"### {ylabel}", "", f"![{ylabel}]({os.path.relpath(path, out.parent)})", ""]
    md += ["## Summary (mean ± std over seeds)", "",
           *table(["panel", line, "finished", "initial pass@1", "best pass@1", "final pass@1", "collapsed",
                   "diverged", "peak entropy"], [c.summary_row() for c in cells]),
           "", *(probe_section(probe, figures_dir, out) if probe else []),
           "## Reading", "", *reading(cells, reference), "",
           *(["## Notes", "", notes.read_text(encoding="utf-8").strip(), ""] if notes else []),
           "## Every run", "",
           *table(["panel", line, "seed", "status", "rounds", "initial", "best", "final", "collapse step",
                   "divergence"], seed_rows(cells)), ""]
    write_text_atomic(out, "\n".join(md))
    console.print(f"report: {out} (figures in {figures_dir})")
    return out
