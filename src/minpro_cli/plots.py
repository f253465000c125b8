"""PNG plots: ratio distributions of an inspection, and training curves of a run."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure

from minpro_cli.errors import MinproError
from minpro_cli.fileio import atomic_path, read_jsonl
from minpro_cli.ratiostats import HIST_BINS, HIST_RANGE, QUANTITIES, RatioStats


def save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def histogram_figure(stats: RatioStats) -> Figure:
    """Histogram of each quantity on a log-ratio axis."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), layout="constrained")
    edges = torch.linspace(-HIST_RANGE, HIST_RANGE, HIST_BINS + 1, dtype=torch.float64).exp()
    for ax, (key, label) in zip(axes.flat, QUANTITIES.items()):
        counts = stats.summaries[key].hist
        nonzero = torch.nonzero(counts).flatten()
        if nonzero.numel():
            lo, hi = int(nonzero[0]), int(nonzero[-1]) + 1
            # merge fine bins so a bar stays visible: ~80 bars over the occupied range
            step = max(1, (hi - lo) // 80)
            cuts = [*range(lo, hi, step), hi]
            sums = [int(counts[a:b].sum()) for a, b in itertools.pairwise(cuts)]
            ax.stairs(sums, [float(edges[c]) for c in cuts], fill=True, alpha=0.7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axvline(1.0, color="black", linewidth=0.8, linestyle=":")
        ax.set_xlabel(f"{label} (log scale)")
        ax.set_ylabel("tokens")
        ax.set_title(label)
    fig.suptitle(f"ratio distributions: {stats.n_sequences} sequences, {stats.n_tokens()} tokens")
    return fig


def position_figure(report: dict[str, Any]) -> Figure:
    """The four quantities against absolute and relative position in the response."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    for ax, kind, xlabel in [(axes[0], "absolute", "position in the response (tokens, bin start)"),
                             (axes[1], "relative", "relative position in the response")]:
        bins = report["by_position"][kind]
        x = [int(b["bin"].split("–")[0]) if kind == "absolute" else float(b["bin"].split("–")[0]) + 0.05
             for b in bins]
        mean_prefix = [b["log_prefix_ratio_mean"] for b in bins]
        std_prefix = [b["log_prefix_ratio_std"] for b in bins]
        ax.plot(x, [b["log_token_ratio_mean"] for b in bins], marker="o", label="mean log ρ_t")
        ax.plot(x, mean_prefix, marker="o", label="mean log ρ_1:t (± std)")
        ax.fill_between(x, [m - s for m, s in zip(mean_prefix, std_prefix)],
                        [m + s for m, s in zip(mean_prefix, std_prefix)], alpha=0.2, color="C1")
        ax.plot(x, [math.log(b["min_prefix_ratio_mean"]) for b in bins], marker="o", label="log mean ρ̲_t")
        ax.plot(x, [math.log(b["min_prefix_ratio_mean"]) + b["log_token_ratio_mean"] for b in bins],
                marker=".", linestyle="--", label="log mean ρ̲_t + mean log ρ_t")
        if kind == "absolute":
            ax.set_xscale("log", base=2)
        ax.axhline(0.0, color="black", linewidth=0.8, linestyle=":")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("log ratio")
        ax.legend(fontsize=8)
    fig.suptitle("ratios along the response, by token position")
    return fig


def first_break_figure(report: dict[str, Any]) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for tau, b in report["first_break"].items():
        labels = list(b["relative"])
        counts = list(b["relative"].values())
        total = max(b["sequences"], 1)
        ax.plot(range(len(labels)), [c / total for c in counts], marker="o",
                label=f"τ = {tau}: {b['fraction_broken']:.0%} of sequences break")
        ax.set_xticks(range(len(labels)), labels, rotation=45, fontsize=7)
    ax.set_xlabel("relative position where ρ̲_t first falls below τ")
    ax.set_ylabel("fraction of sequences")
    ax.legend(fontsize=8)
    ax.set_title("where prefixes break")
    return fig


def plot_inspection(stats: RatioStats, report: dict[str, Any], directory: Path) -> list[Path]:
    boundary = [save(boundary_figure(report), directory / "ratios_by_version_boundary.png")] \
        if report.get("version_boundary") else []  # fmt: skip
    return [
        save(histogram_figure(stats), directory / "ratio_histograms.png"),
        save(position_figure(report), directory / "ratios_by_position.png"),
        save(first_break_figure(report), directory / "first_break.png"),
        *boundary,
    ]


def boundary_figure(report: dict[str, Any]) -> Figure:
    """ρ_t, ρ̲_t and ρ_1:t by distance from the first version switch: where the token ratio
    forgets the old version, the prefix minimum remembers it and the product compounds it."""
    bins = [b for b in report["version_boundary"] if b["bin"] != "no switch"]
    fig, ax = plt.subplots(figsize=(9, 4.5), layout="constrained")
    x = range(len(bins))
    ax.plot(x, [b["log_token_ratio_mean"] for b in bins], marker="o", label="mean log ρ_t")
    ax.plot(x, [math.log(b["min_prefix_ratio_mean"]) for b in bins], marker="o", label="log mean ρ̲_t")
    ax.plot(x, [b["log_prefix_ratio_mean"] for b in bins], marker="o", label="mean log ρ_1:t")
    labels = [b["bin"] for b in bins]
    ax.set_xticks(list(x), labels)
    if "0" in labels:
        ax.axvline(labels.index("0") - 0.5, color="grey", linestyle="--", linewidth=0.8)
    ax.axhline(0.0, color="black", linewidth=0.8, linestyle=":")
    ax.set_xlabel("tokens from the response's first version switch (0: first token of the newer weights)")
    ax.set_ylabel("log ratio")
    ax.legend(fontsize=8)
    fig.suptitle("ratios across the version boundary")
    return fig


TRAINING_PANELS = [
    ("reward", ["reward_mean"]),
    ("entropy", ["entropy"]),
    ("gradient norm", ["grad_norm"]),
    ("token ratio ρ_t", ["ratios/token_ratio_mean", "ratios/token_ratio_p5", "ratios/token_ratio_p95"]),
    ("min prefix ratio ρ̲_t", ["ratios/min_prefix_ratio_mean", "ratios/min_prefix_ratio_p5"]),
    ("KL(μ‖π) and mean (log ρ)²", ["ratios/kl_k3", "ratios/m2"]),
]


def training_figure(metrics: list[dict[str, Any]], title: str, evals: list[dict[str, Any]] | None = None) -> Figure:
    """The training panels; held-out pass@1 (evals.jsonl) joins the reward panel as points."""
    fig, axes = plt.subplots(2, 3, figsize=(14, 7), layout="constrained")
    steps = [m["step"] for m in metrics]
    for ax, (label, keys) in zip(axes.flat, TRAINING_PANELS):
        for key in keys:
            values = [m.get(key, math.nan) for m in metrics]
            if any(math.isfinite(v) for v in values):
                ax.plot(steps, values, label=key.removeprefix("ratios/"))
        if label == "reward":
            for key in sorted({k for e in evals or [] for k in e if k.endswith("pass@1")}):
                points = [(e["step"], e[key]) for e in evals or [] if key in e]
                ax.plot(*zip(*points), "o-", label=f"held-out {key.removeprefix('eval/')}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.ticklabel_format(axis="y", useOffset=False)  # an on-policy ρ ≈ 1 reads 1.0000, not 1e−5+9.999e−1
        if len(ax.get_lines()) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    return fig


def plot_run(run_dir: Path) -> Path:
    """`minpro plot RUN_DIR`: training curves from metrics.jsonl into RUN_DIR/plots/training.png."""
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise MinproError(f"{metrics_path} not found: point `minpro plot` at a run directory that `minpro train` wrote")
    metrics = read_jsonl(metrics_path, "round")
    if not metrics:
        raise MinproError(f"{metrics_path} is empty: no round has finished yet")
    evals_path = run_dir / "evals.jsonl"
    evals = read_jsonl(evals_path, "round") if evals_path.is_file() else []
    figure = training_figure(metrics, f"{run_dir}: {len(metrics)} rounds", evals)
    return save(figure, run_dir / "plots" / "training.png")


@dataclass
class Band:
    """One line of a sweep figure: the mean over seeds at each x, and the seeds' min and max."""

    label: str
    x: list[float]
    mean: list[float]
    low: list[float]
    high: list[float]


def line_color(k: int, lines: int) -> Any:
    """The k-th line's colour: matplotlib's ten-colour cycle while it suffices, else tab20 (the
    arena compares 18 objectives, and a repeated colour makes two lines one)."""
    return f"C{k}" if lines <= 10 else plt.get_cmap("tab20")(k % 20)


def sweep_figure(panels: dict[str, list[Band]], ylabel: str, xlabel: str = "optimizer step") -> Figure:
    """One panel per grid point (e.g. staleness), one line per compared value (e.g. objective)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1.2, 3.4), layout="constrained",
                             sharey=True, squeeze=False)
    labels = list(dict.fromkeys(band.label for bands in panels.values() for band in bands))
    many = len(labels) > 10
    looks = {label: (line_color(k, len(labels)), "--" if many and k % 2 else "-")  # dashed: tab20's light twin
             for k, label in enumerate(labels)}
    for ax, (title, bands) in zip(axes[0], panels.items()):
        for band in bands:
            color, linestyle = looks[band.label]
            ax.plot(band.x, band.mean, color=color, label=band.label, linewidth=1.4, linestyle=linestyle)
            ax.fill_between(band.x, band.low, band.high, color=color, alpha=0.18, linewidth=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8)
    return fig


def probe_figure(cells: list[Any]) -> Figure:
    """`minpro probe`: cos(g_obj, g★) and ‖g_obj‖/‖g★‖ against staleness, one line per objective
    with its ±2 s.e. band; dashed, the noise floor (a fresh on-policy sample of the same size)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    behaviors = list(dict.fromkeys(c.behavior for c in cells))
    position = {b: next((c.staleness for c in cells if c.behavior == b and c.staleness is not None), i)
                for i, b in enumerate(behaviors)}  # fmt: skip
    for ax, (quantity, floor, label) in zip(axes, [("cosine", "floor_cosine", "cos(g_obj, g★)"),
                                                    ("norm_ratio", "floor_norm_ratio", "‖g_obj‖ / ‖g★‖")]):  # fmt: skip
        switches = list(dict.fromkeys(c.switch_at for c in cells))  # one line style each: mixed-version samples
        objectives = list(dict.fromkeys(c.objective for c in cells))
        for k, objective in enumerate(objectives):
            color = line_color(k, len(objectives))
            for j, at in enumerate(switches):
                mine = sorted((c for c in cells if c.objective == objective and c.switch_at == at),
                              key=lambda c: position[c.behavior])  # fmt: skip
                x = [position[c.behavior] for c in mine]
                mean = [c.summaries[quantity].mean for c in mine]
                se = [0.0 if math.isnan(c.summaries[quantity].se) else c.summaries[quantity].se for c in mine]
                line = objective if at is None else f"{objective}, switch at {at}"
                ax.plot(x, mean, marker="os^vD"[j % 5], color=color, label=line, linewidth=1.4,
                        linestyle=["-", "-.", ":", (0, (5, 1))][j % 4])  # fmt: skip
                ax.fill_between(x, [m - 2 * s for m, s in zip(mean, se)], [m + 2 * s for m, s in zip(mean, se)],
                                color=color, alpha=0.15, linewidth=0)  # fmt: skip
                if j == 0:
                    ax.plot(x, [c.summaries[floor].mean for c in mine], linestyle="--", color=color, alpha=0.6,
                            linewidth=1)  # fmt: skip
        ax.set_xlabel("staleness (optimizer steps)" if any(c.staleness is not None for c in cells) else "behaviour")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    legend = {"fontsize": 8, "title": "dashed: noise floor", "title_fontsize": 8}
    if len(objectives) > 10:  # a legend this long would cover the lines
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right center", **legend)
    else:
        axes[0].legend(**legend)
    return fig
