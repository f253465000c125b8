"""`minpro inspect-ratios`: ratio statistics of saved rollouts against a policy, streamed.

Behaviour log-probs come from the rollout files; target log-probs from a forward pass of the
policy (batched, no grad) or, without a policy, from each file's `target_logprobs` column.
With an anchor (`--anchor`: the weights that sampled the rows, scored by the trainer), the
ratio splits into its two factors, each with its own statistics and ρ̲_t by position: the
mismatch π_anchor/μ and the drift π/π_anchor (docs/correction.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from minpro_cli.console import console, progress_bar, titled_table
from minpro_cli.correction import log_behavior_factor
from minpro_cli.errors import ConfigError, MinproError, RolloutFileError
from minpro_cli.fileio import write_json_output
from minpro_cli.logprobs import pack, pad_rows, pad_versions, response_logprobs
from minpro_cli.modeling import Policy, tokenizer_fingerprint
from minpro_cli.ratiostats import (
    BOUNDARY_LABELS,
    DEFAULT_THRESHOLDS,
    QUANTITIES,
    PositionBins,
    RatioStats,
    boundary_bins,
    log_quantities,
)
from minpro_cli.registry import load_plugin
from minpro_cli.rollouts import (
    SCHEMA,
    TARGET_LOGPROBS_FIELD,
    RolloutRow,
    RolloutSpec,
    iter_rollout_batches,
    open_rollout_file,
    recorded_recipe,
    rollout_files,
)

GroupBy = Literal["policy_version", "staleness", "position", "version_boundary"]
ROW_GROUPS = ("policy_version", "staleness")  # --by values that split the rows into groups
FACTORS = {"mismatch": "mismatch π_anchor/μ", "drift": "drift π/π_anchor"}
COLUMNS = [*SCHEMA.names, TARGET_LOGPROBS_FIELD.name]


@dataclass(frozen=True)
class InspectOptions:
    batch_size: int = 64
    eps_low: float = 0.2
    eps_high: float = 0.2
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    by: GroupBy | None = None
    policy_step: int | None = None  # optimizer step of the policy, for --by staleness
    worst: int = 5

    def new_stats(self) -> RatioStats:
        return RatioStats(self.eps_low, self.eps_high, self.thresholds, worst_k=self.worst)


@torch.no_grad()
def target_logprobs(policy: Policy, rows: list[RolloutRow]) -> torch.Tensor:
    """(B, T) log π_θ of each row's response tokens, right-padded; rows may mix temperatures."""
    width = max(len(r.response_token_ids) for r in rows)
    out = torch.zeros(len(rows), width, dtype=torch.float32)
    by_temperature: dict[float, list[int]] = {}
    for i, r in enumerate(rows):
        by_temperature.setdefault(float(r.temperature), []).append(i)
    for temperature, index in by_temperature.items():
        packed = pack([rows[i].prompt_token_ids for i in index], [rows[i].response_token_ids for i in index],
                      policy.pad_token_id)
        with policy.autocast():
            logprobs, _ = response_logprobs(policy.model, packed, temperature)
        out[index, : logprobs.shape[1]] = logprobs.float().cpu()
    return out


def batch_log_ratios(
    rows: list[RolloutRow], policy: Policy | None, anchor: Policy | None = None
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Clamped log ρ (B, T), the response mask, and with an anchor each factor's log ratio."""
    lengths = torch.tensor([len(r.response_token_ids) for r in rows])
    width = int(lengths.max())
    mask = torch.arange(width)[None, :] < lengths[:, None]
    if policy is not None:
        target = target_logprobs(policy, rows)
    else:
        target = pad_rows([r.target_logprobs or [] for r in rows], torch.zeros(len(rows), width))
    behaviour = pad_rows([r.behavior_logprobs for r in rows], target)
    factors = {}
    if anchor is not None:
        scored = target_logprobs(anchor, rows)
        factors = {"mismatch": log_behavior_factor(scored.double(), behaviour.double(), mask),
                   "drift": log_behavior_factor(target.double(), scored.double(), mask)}
    return log_behavior_factor(target.double(), behaviour.double(), mask), mask, factors


def check_source(
    path: Path, table_columns: Iterable[str], fingerprints: set[str], policy: Policy | None, expected: str | None
) -> None:
    """`expected`: the policy's tokenizer fingerprint, computed once by the caller."""
    if policy is None:
        if TARGET_LOGPROBS_FIELD.name not in table_columns:
            raise RolloutFileError(
                f"{path}: no '{TARGET_LOGPROBS_FIELD.name}' column, so the target log-probs must come from a "
                "policy: pass --policy CHECKPOINT"
            )
        return
    if fingerprints != {expected}:
        raise RolloutFileError(
            f"{path}: rows were tokenized with tokenizer {', '.join(sorted(fingerprints))}, but {policy.path} has "
            f"tokenizer {expected}; ratios would compare different tokens. Score them with the model that "
            "sampled them or a checkpoint trained from it"
        )


def group_key(row: RolloutRow, options: InspectOptions) -> str | None:
    if options.by == "policy_version":
        return str(row.policy_version)
    if options.by == "staleness":
        assert options.policy_step is not None
        return str(options.policy_step - row.policy_version)
    return None


def inspect_ratios(
    rollouts: RolloutSpec,
    policy: Policy | None,
    options: InspectOptions | None = None,
    json_path: Path | None = None,
    plot_dir: Path | None = None,
    anchor: Policy | None = None,
) -> dict[str, Any]:
    """Stream the rollout set, print the report, optionally write JSON and plots; return the report."""
    options = options or InspectOptions()
    if options.by == "staleness" and options.policy_step is None:
        raise ConfigError(
            "--by staleness needs the policy's optimizer step: the checkpoint has no trainer_state.json, "
            "so pass --policy-step N"
        )
    overall, groups, factors, boundary = score_rollouts(rollouts, policy, options, anchor)
    report = overall.report()
    if factors:
        report["factors"] = {name: stats.report() for name, stats in factors.items()}
    report["worst"] = [decode_worst(item, policy) for item in report["worst"]]
    if boundary is not None:
        report["by"] = options.by
        report["version_boundary"] = boundary.report(BOUNDARY_LABELS)
    if options.by in ROW_GROUPS:
        report["by"] = options.by
        report["groups"] = {key: groups[key].report() for key in sorted(groups, key=int)}
        for group in report["groups"].values():
            group["worst"] = [decode_worst(item, policy) for item in group["worst"]]
    report["source"] = " ".join(map(str, rollouts)) if isinstance(rollouts, list) else str(rollouts)
    print_report(report, report["source"], options)
    if json_path is not None:
        write_json_output(json_path, report)
    if plot_dir is not None:
        from minpro_cli.plots import plot_inspection

        for written in plot_inspection(overall, report, plot_dir):
            console.print(f"plot: {written}")
    return report


def score_rollouts(
    rollouts: RolloutSpec, policy: Policy | None, options: InspectOptions, anchor: Policy | None = None
) -> tuple[RatioStats, dict[str, RatioStats], dict[str, RatioStats], PositionBins | None]:
    """Stream the rollout set in batches: the statistics of every token, of each `--by` group,
    with an anchor of each factor, and by `--by version_boundary` the ratios by distance from
    each response's first version switch."""
    total = sum(open_rollout_file(p).metadata.num_rows for p in rollout_files(rollouts))
    overall, groups = options.new_stats(), dict[str, RatioStats]()
    boundary = PositionBins(len(BOUNDARY_LABELS)) if options.by == "version_boundary" else None
    factors = {name: options.new_stats() for name in FACTORS} if anchor is not None else {}
    expected = tokenizer_fingerprint(policy.tokenizer) if policy is not None else None
    for model in (policy, anchor):
        if model is not None:
            model.model.eval()
    with progress_bar("scoring rollouts", total=total) as bar:
        for path, table in iter_rollout_batches(
            rollouts, options.batch_size, COLUMNS, policy.vocab_size if policy is not None else None
        ):
            fingerprints = set(table["tokenizer_fingerprint"].to_pylist())
            check_source(path, table.column_names, fingerprints, policy, expected)
            if anchor is not None:
                check_source(path, table.column_names, fingerprints, anchor, tokenizer_fingerprint(anchor.tokenizer))
            rows = RolloutRow.from_table(table)
            log_rho, mask, log_factors = batch_log_ratios(rows, policy, anchor)
            overall.add(log_rho, mask, rows, path.name)
            for name, log_f in log_factors.items():
                factors[name].add(log_f, mask, rows, path.name)
            if boundary is not None:
                add_by_boundary(boundary, rows, log_rho, mask)
            if options.by in ROW_GROUPS:
                keys = [group_key(r, options) for r in rows]
                for key in dict.fromkeys(keys):
                    index = [i for i, k in enumerate(keys) if k == key]
                    groups.setdefault(key, options.new_stats()).add(log_rho[index], mask[index],
                                                                    [rows[i] for i in index], path.name)
            bar.advance(len(rows))
    return overall, groups, factors, boundary


def add_by_boundary(bins: PositionBins, rows: list[RolloutRow], log_rho: torch.Tensor, mask: torch.Tensor) -> None:
    """Each trained token's ρ_t, ρ̲_t and ρ_1:t into the bin of its distance from the switch."""
    versions = pad_versions([list(r.behavior_versions or []) for r in rows], mask)
    logs = log_quantities(log_rho, mask)
    bins.add(boundary_bins(versions, mask)[mask], logs["token_ratio"][mask], logs["prefix_ratio"][mask],
             logs["min_prefix_ratio"][mask])  # fmt: skip


def clip_range(rollouts: RolloutSpec, eps_low: float | None, eps_high: float | None) -> tuple[float, float]:
    """The clip range the fractions count against: given values, else the ε of the objective in the
    recipe the first file records (so they agree with training's clip fractions), else 0.2."""
    if eps_low is not None and eps_high is not None:
        return eps_low, eps_high
    objective = (recorded_recipe(rollout_files(rollouts)[0]) or {}).get("objective") or {}
    try:
        plugin = load_plugin("objectives", objective["name"], objective.get("options") or {})
        recorded = float(plugin.eps_low), float(plugin.eps_high)
        console.print(f"clip range from the rollouts' recipe: objective '{objective['name']}', "
                      f"eps_low {recorded[0]:g}, eps_high {recorded[1]:g}")
    except (KeyError, TypeError, AttributeError, MinproError):
        recorded = 0.2, 0.2
    return (eps_low if eps_low is not None else recorded[0]), (eps_high if eps_high is not None else recorded[1])


def decode_worst(item: dict[str, Any], policy: Policy | None) -> dict[str, Any]:
    """Replace the token ids by the token where the ratio fell and the text just before it."""
    ids = item.pop("token_ids")
    at = item["position"] - 1
    item["token_id"] = ids[at]
    if policy is not None:
        item["token"] = policy.tokenizer.decode([ids[at]])
        item["context"] = policy.tokenizer.decode(ids[max(0, at - 24) : at])
    return item


def print_report(report: dict[str, Any], source: str, options: InspectOptions) -> None:
    stats = ["mean", "std", "min", "p1", "p5", "p50", "p95", "p99", "max"]
    table = titled_table(f"ratios of {source}: {report['n_sequences']} sequences, {report['n_tokens']} tokens")
    table.add_column("quantity")
    for s in stats:
        table.add_column(s, justify="right", overflow="fold")
    for t in options.thresholds:
        table.add_column(f"<{t:g}", justify="right", overflow="fold")
    for key, label in QUANTITIES.items():
        q = report[key]
        if q["count"]:
            table.add_row(label, *[f"{q[s]:.4g}" for s in stats],
                          *[f"{q['frac_below'][str(t)]:.1%}" for t in options.thresholds])
    console.print(table)
    clip, ess = report["clip"], report["ess"]
    console.print(
        f"KL(μ‖π): k1 {report['kl_k1']:.3g}, k3 {report['kl_k3']:.3g}   mean (log ρ)² {report['m2']:.3g}   "
        f"clipped at [1−{clip['eps_low']:g}, 1+{clip['eps_high']:g}]: ρ_t {clip['token_ratio']['total']:.1%} "
        f"(low {clip['token_ratio']['low']:.1%}, high {clip['token_ratio']['high']:.1%}), "
        f"ρ̲_t·ρ_t {clip['minpro_weight']['total']:.1%}   ESS: tokens ρ_t {ess['token_ratio']:.3f}, "
        f"ρ̲_t·ρ_t {ess['minpro_weight']:.3f}, ρ_1:t {ess['prefix_ratio']:.3f}; sequences ρ_1:|o| {ess['sequence']:.3f}"
    )
    print_by_position(report["by_position"]["absolute"], "by position in the response (tokens)")
    for name, factor in report.get("factors", {}).items():
        console.print(f"{FACTORS[name]}: KL k1 {factor['kl_k1']:.3g}, k3 {factor['kl_k3']:.3g}, "
                      f"ESS tokens {factor['ess']['token_ratio']:.3f}, sequences {factor['ess']['sequence']:.3f}")
        print_by_position(factor["by_position"]["absolute"], f"{FACTORS[name]} by position (ρ̲_t of this factor)")
    if "version_boundary" in report:
        print_by_position(report["version_boundary"], "by distance from the response's first version switch "
                          "(0: the first token the newer weights drew)")  # fmt: skip
    print_first_breaks(report["first_break"])
    print_worst(report["worst"])
    if "groups" in report:
        print_groups(report["by"], report["groups"])


def print_by_position(bins: list[dict[str, Any]], title: str) -> None:
    table = titled_table(title)
    for column in ("position", "tokens", "mean log ρ_t", "mean log ρ_1:t", "std log ρ_1:t", "mean ρ̲_t", "min ρ̲_t"):
        table.add_column(column, justify="right", overflow="fold")
    for b in bins:
        table.add_row(b["bin"], str(b["count"]), f"{b['log_token_ratio_mean']:+.4f}",
                      f"{b['log_prefix_ratio_mean']:+.3f}", f"{b['log_prefix_ratio_std']:.3f}",
                      f"{b['min_prefix_ratio_mean']:.4f}", f"{b['min_prefix_ratio_min']:.3g}")
    console.print(table)


def print_first_breaks(breaks: dict[str, dict[str, Any]]) -> None:
    table = titled_table("where prefixes break: first position with ρ̲_t < τ")
    for column in ("τ", "sequences broken", "mean position", "by relative position (tenths of the response)"):
        table.add_column(column, justify="right", overflow="fold")
    for tau, b in breaks.items():
        spread = " ".join(str(c) for c in b["relative"].values())
        mean = "—" if b["mean_position"] is None else f"{b['mean_position']:.1f}"
        table.add_row(tau, f"{b['fraction_broken']:.1%}", mean, spread)
    console.print(table)


def print_worst(worst: list[dict[str, Any]]) -> None:
    if not worst:
        return
    table = titled_table("sequences with the smallest ρ̲ at their end")
    for column in ("prompt_id", "sample", "reward", "min ρ", "at / length", "token", "text before it"):
        table.add_column(column)
    for w in worst:
        token = repr(w.get("token", w["token_id"]))
        context = w.get("context", "")[-40:].replace("\n", "⏎")
        table.add_row(str(w["prompt_id"]), str(w["sample_index"]), f"{w['reward']:.2f}", f"{w['min_ratio']:.3g}",
                      f"{w['position']} / {w['response_length']}", token, context)
    console.print(table)


def print_groups(by: str, groups: dict[str, Any]) -> None:
    table = titled_table(f"by {by}")
    columns = ("group", "sequences", "tokens", "mean ρ_t", "p5 ρ̲_t", "mean ρ̲_t·ρ_t", "p50 ρ_1:t", "k3 KL",
               "(log ρ)²", "clip ρ_t")
    for column in columns:
        table.add_column(column, justify="right", overflow="fold")
    for key, r in groups.items():
        table.add_row(key, str(r["n_sequences"]), str(r["n_tokens"]), f"{r['token_ratio']['mean']:.4f}",
                      f"{r['min_prefix_ratio']['p5']:.4f}", f"{r['minpro_weight']['mean']:.4f}",
                      f"{r['prefix_ratio']['p50']:.4g}", f"{r['kl_k3']:.3g}", f"{r['m2']:.3g}",
                      f"{r['clip']['token_ratio']['total']:.1%}")
    console.print(table)
