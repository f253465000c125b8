"""`minpro inspect-ratios`: statistics of ρ_t, ρ̲_t and ρ̲_t·ρ_t of saved rollouts against a policy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from minpro_cli.console import console, progress_bar, warn
from minpro_cli.fileio import write_json_atomic
from minpro_cli.modeling import Policy, pack, pad_rows, response_logprobs, tokenizer_fingerprint
from minpro_cli.objectives.logratios import log_min_prefix_ratio, log_prefix_ratio, log_token_ratio
from minpro_cli.rollouts import read_rollouts

QUANTITIES = {
    "token_ratio": "ρ_t",
    "min_prefix_ratio": "ρ̲_t (min over i<t)",
    "minpro_weight": "ρ̲_t·ρ_t",
    "prefix_ratio": "ρ_1:t (cumulative)",
}
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


@torch.no_grad()
def log_ratios(policy: Policy, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Per-token log of each quantity for a batch of rows, flattened over response tokens."""
    packed = pack([r["prompt_token_ids"] for r in rows], [r["response_token_ids"] for r in rows], policy.pad_token_id)
    temperature = float(rows[0]["temperature"])
    logprobs, _ = response_logprobs(policy.model, packed, temperature)
    old = pad_rows([r["behavior_logprobs"] for r in rows], logprobs)
    mask = packed.response_mask.to(logprobs.device)
    log_rho = log_token_ratio(logprobs, old)
    log_min = log_min_prefix_ratio(log_rho, mask)
    return {
        "token_ratio": log_rho[mask],
        "min_prefix_ratio": log_min[mask],
        "minpro_weight": (log_min + log_rho)[mask],
        "prefix_ratio": log_prefix_ratio(log_rho, mask)[mask],
    }


def summarize(log_values: torch.Tensor) -> dict[str, float]:
    values = log_values.double().exp()
    qs = torch.quantile(values, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
    return {
        "count": int(values.numel()),
        "mean": float(values.mean()),
        "std": float(values.std()) if values.numel() > 1 else 0.0,
        "min": float(values.min()),
        "max": float(values.max()),
        **{f"p{round(q * 100)}": v for q, v in zip(QUANTILES, qs)},
    }


def inspect_ratios(
    rollouts: str, policy: Policy, batch_size: int = 64, json_path: Path | None = None
) -> dict[str, Any]:
    rows = read_rollouts(rollouts).to_pylist()
    if {r["tokenizer_fingerprint"] for r in rows} != {tokenizer_fingerprint(policy.tokenizer)}:
        warn("the rollouts were tokenized with a different tokenizer than the policy's: ratios are meaningless")
    policy.model.eval()
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in QUANTITIES}
    with progress_bar("scoring", total=len(rows)) as bar:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            for key, values in log_ratios(policy, chunk).items():
                parts[key].append(values)
            bar.advance(len(chunk))
    report: dict[str, Any] = {"n_sequences": len(rows)}
    for key in QUANTITIES:
        report[key] = summarize(torch.cat(parts[key]))
    report["n_tokens"] = report["token_ratio"]["count"]
    log_rho = torch.cat(parts["token_ratio"]).double()
    report["kl_k1"] = float((-log_rho).mean())  # E_μ[log μ − log π]
    report["kl_k3"] = float((log_rho.exp() - 1 - log_rho).mean())
    print_report(report, rollouts)
    if json_path is not None:
        write_json_atomic(json_path, report)
    return report


def print_report(report: dict[str, Any], source: str) -> None:
    table = Table(title=f"ratios of {source}: {report['n_sequences']} sequences, {report['n_tokens']} tokens")
    stats = ["mean", "std", "min", "p1", "p5", "p50", "p95", "p99", "max"]
    table.add_column("quantity")
    for s in stats:
        table.add_column(s, justify="right")
    for key, label in QUANTITIES.items():
        table.add_row(label, *[f"{report[key][s]:.4g}" for s in stats])
    console.print(table)
    console.print(f"KL(μ‖π) estimates: k1 {report['kl_k1']:.3g}, k3 {report['kl_k3']:.3g}")
