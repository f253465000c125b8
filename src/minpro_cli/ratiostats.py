"""Streaming statistics of importance ratios: what `inspect-ratios` reports and `train` logs.

Batches of (log ρ, mask) go in; memory stays fixed however many go in. Means, standard
deviations, extremes, threshold fractions, KL, M2 and ESS are exact. Quantiles are read off a
log-space histogram with bins 0.01 wide (1% relative) over e^±50, and bins 1e-4 wide within
e^±0.05 of 1 (where on-policy noise lives), clamped to the exact min/max.

Quantities, per trained response token t (log ρ_t = log π_θ − log μ, clamped to ±20):
    token_ratio       ρ_t
    min_prefix_ratio  ρ̲_t = min_{i<t} ρ_i    (strict, 1 on the first token)
    minpro_weight     ρ̲_t · ρ_t
    prefix_ratio      ρ_{1:t} = ∏_{i≤t} ρ_i  (not clamped: its explosion is the point)
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from minpro_cli.objectives.logratios import log_min_prefix_ratio, log_prefix_ratio
from minpro_cli.rollouts import RolloutRow

QUANTITIES = {
    "token_ratio": "ρ_t",
    "min_prefix_ratio": "ρ̲_t (min over i<t)",
    "minpro_weight": "ρ̲_t·ρ_t",
    "prefix_ratio": "ρ_1:t (cumulative)",
}
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
DEFAULT_THRESHOLDS = (0.1, 0.5, 2.0)
HIST_RANGE, HIST_BINS = 50.0, 10_000
FINE_RANGE, FINE_BINS = 0.05, 1_000  # |log ρ| ≤ 0.05 at 1e-4: resolves near-on-policy noise
MAX_LOG_BIN = 24  # absolute position bins 1, 2–3, 4–7, …, 2^23 and beyond
RELATIVE_BINS = 10


def log_quantities(log_rho: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four quantities in log space, (B, T) each, from clamped token log-ratios."""
    log_rho = log_rho.detach().double()
    log_min = log_min_prefix_ratio(log_rho, mask)
    return {
        "token_ratio": log_rho,
        "min_prefix_ratio": log_min,
        "minpro_weight": log_min + log_rho,
        "prefix_ratio": log_prefix_ratio(log_rho, mask),
    }


@dataclass
class Summary:
    """Running count / mean / spread / extremes / histogram of exp(log values)."""

    thresholds: tuple[float, ...]
    count: int = 0
    mean: float = 0.0
    sq_dev: float = 0.0  # Σ (x − mean)², merged with Chan et al.'s formula
    min: float = math.inf
    max: float = -math.inf
    hist: torch.Tensor = field(default_factory=lambda: torch.zeros(HIST_BINS, dtype=torch.long))
    fine: torch.Tensor = field(default_factory=lambda: torch.zeros(FINE_BINS, dtype=torch.long))
    below_fine: int = 0  # values with log < −FINE_RANGE
    below: list[int] = field(default_factory=list)
    above: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.below = [0] * len(self.thresholds)
        self.above = [0] * len(self.thresholds)

    def add(self, log_values: torch.Tensor) -> None:
        if log_values.numel() == 0:
            return
        values = log_values.double().clamp(max=700.0).exp()
        n, batch_mean = values.numel(), float(values.mean())
        batch_sq = float(((values - batch_mean) ** 2).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        self.sq_dev += batch_sq + delta * delta * self.count * n / total
        self.mean += delta * n / total
        self.count = total
        self.min, self.max = min(self.min, float(values.min())), max(self.max, float(values.max()))
        logs = log_values.double()
        self.hist += torch.histc(logs.clamp(-HIST_RANGE, HIST_RANGE), HIST_BINS, -HIST_RANGE, HIST_RANGE).long()
        near_one = logs[logs.abs() <= FINE_RANGE]
        if near_one.numel():
            self.fine += torch.histc(near_one, FINE_BINS, -FINE_RANGE, FINE_RANGE).long()
        self.below_fine += int((logs < -FINE_RANGE).sum())
        for i, tau in enumerate(self.thresholds):
            self.below[i] += int((values < tau).sum())
            self.above[i] += int((values > tau).sum())

    def quantile(self, q: float) -> float:
        """From the fine histogram when the q-th value lies within e^±0.05, else the coarse one."""
        target, in_fine = q * self.count, int(self.fine.sum())
        if in_fine and self.below_fine <= target <= self.below_fine + in_fine:
            log_value = histogram_quantile(self.fine, FINE_RANGE, target - self.below_fine)
        else:
            log_value = histogram_quantile(self.hist, HIST_RANGE, target)
        return min(max(math.exp(log_value), self.min), self.max)

    def ess(self) -> float:
        """(Σw)² / (n Σw²): 1 when all weights are equal, 1/n when one weight dominates."""
        second = self.sq_dev + self.count * self.mean**2
        return self.count * self.mean**2 / second if second > 0 else float("nan")

    def report(self) -> dict[str, Any]:
        if self.count == 0:
            return {"count": 0}
        return {
            "count": self.count,
            "mean": self.mean,
            "std": math.sqrt(self.sq_dev / (self.count - 1)) if self.count > 1 else 0.0,
            "min": self.min,
            "max": self.max,
            **{f"p{round(q * 100)}": self.quantile(q) for q in QUANTILES},
            "frac_below": {str(t): b / self.count for t, b in zip(self.thresholds, self.below)},
            "frac_above": {str(t): a / self.count for t, a in zip(self.thresholds, self.above)},
        }


def histogram_quantile(hist: torch.Tensor, half_range: float, target: float) -> float:
    """The value below which `target` of the counts lie, interpolated inside its bin
    (bins split [−half_range, half_range] evenly)."""
    cumulative = hist.cumsum(0).double()
    index = int(torch.searchsorted(cumulative, torch.tensor([target], dtype=torch.float64)).clamp(max=len(hist) - 1))
    before = float(cumulative[index - 1]) if index else 0.0
    inside = float(hist[index]) or 1.0
    return -half_range + 2 * half_range / len(hist) * (index + (target - before) / inside)


def absolute_bin(position: torch.Tensor) -> torch.Tensor:
    """0-based position → bin k holding 1-based positions [2^k, 2^(k+1))."""
    return torch.log2((position + 1).double()).floor().long().clamp(max=MAX_LOG_BIN - 1)


def absolute_bin_labels() -> list[str]:
    return [f"{2**k}" if k == 0 else f"{2**k}–{2 ** (k + 1) - 1}" for k in range(MAX_LOG_BIN)]


def relative_bin_labels() -> list[str]:
    return [f"{k / RELATIVE_BINS:.1f}–{(k + 1) / RELATIVE_BINS:.1f}" for k in range(RELATIVE_BINS)]


@dataclass
class PositionBins:
    """Per position bin: count, mean/std of log ρ_t and log ρ_1:t, mean and min of ρ̲_t."""

    n_bins: int
    sums: torch.Tensor = field(init=False)  # columns: n, Σlogρ, Σlogρ², Σlogρ1:t, Σlogρ1:t², Σρ̲
    low: torch.Tensor = field(init=False)  # min log ρ̲

    def __post_init__(self) -> None:
        self.sums = torch.zeros(self.n_bins, 6, dtype=torch.float64)
        self.low = torch.full((self.n_bins,), math.inf, dtype=torch.float64)

    def add(self, bins: torch.Tensor, log_rho: torch.Tensor, log_prefix: torch.Tensor, log_min: torch.Tensor) -> None:
        columns = torch.stack(
            [torch.ones_like(log_rho), log_rho, log_rho**2, log_prefix, log_prefix**2, log_min.exp()], dim=1
        )
        self.sums.index_add_(0, bins, columns)
        self.low.scatter_reduce_(0, bins, log_min, reduce="amin")

    def report(self, labels: list[str]) -> list[dict[str, Any]]:
        out = []
        for k, label in enumerate(labels):
            n, s1, s2, p1, p2, m = self.sums[k].tolist()
            if n == 0:
                continue
            out.append({
                "bin": label,
                "count": int(n),
                "log_token_ratio_mean": s1 / n,
                "log_token_ratio_std": math.sqrt(max(s2 / n - (s1 / n) ** 2, 0.0)),
                "log_prefix_ratio_mean": p1 / n,
                "log_prefix_ratio_std": math.sqrt(max(p2 / n - (p1 / n) ** 2, 0.0)),
                "min_prefix_ratio_mean": m / n,
                "min_prefix_ratio_min": math.exp(float(self.low[k])),
            })
        return out


# distance of a token from its response's first version switch (token 0: the first token the
# newer weights drew), binned as `boundary_bins` does; responses without a switch are their own bin
BOUNDARY_EDGES = (-16, -8, -4, -1, 0, 1, 2, 5, 9, 17)
BOUNDARY_LABELS = ["no switch", "≤ −17", "−16…−9", "−8…−5", "−4…−2", "−1", "0", "1", "2…4", "5…8", "9…16", "≥ 17"]


def boundary_bins(versions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bin index into BOUNDARY_LABELS of each token: by its distance t − k from the first
    token k whose version differs from the response's first (bin 0: a response with none)."""
    changed = (versions != versions[:, :1]) & mask
    switched = changed.any(-1)
    first = torch.where(switched, changed.float().argmax(-1), 0)
    distance = torch.arange(versions.shape[1])[None, :] - first[:, None]
    bins = torch.bucketize(distance, torch.tensor(BOUNDARY_EDGES), right=True) + 1
    return torch.where(switched[:, None], bins, 0)


@dataclass
class FirstBreaks:
    """Where ρ̲_t first falls below τ in each sequence (1-based position among trained tokens)."""

    tau: float
    sequences: int = 0
    broken: int = 0
    position_sum: float = 0.0
    absolute: torch.Tensor = field(default_factory=lambda: torch.zeros(MAX_LOG_BIN, dtype=torch.long))
    relative: torch.Tensor = field(default_factory=lambda: torch.zeros(RELATIVE_BINS, dtype=torch.long))

    def add(self, log_min: torch.Tensor, mask: torch.Tensor, position: torch.Tensor, length: torch.Tensor) -> None:
        below = (log_min < math.log(self.tau)) & mask
        rows = below.any(-1) & mask.any(-1)
        self.sequences += int(mask.any(-1).sum())
        if not bool(rows.any()):
            return
        first = below.to(torch.uint8).argmax(-1)[rows]
        where = position[rows].gather(1, first[:, None]).squeeze(1)
        self.broken += int(rows.sum())
        self.position_sum += float((where + 1).sum())
        self.absolute += torch.bincount(absolute_bin(where), minlength=MAX_LOG_BIN)
        relative = (where.double() / length[rows] * RELATIVE_BINS).long().clamp(max=RELATIVE_BINS - 1)
        self.relative += torch.bincount(relative, minlength=RELATIVE_BINS)

    def report(self) -> dict[str, Any]:
        labels_abs, labels_rel = absolute_bin_labels(), relative_bin_labels()
        return {
            "sequences": self.sequences,
            "fraction_broken": self.broken / self.sequences if self.sequences else float("nan"),
            "mean_position": self.position_sum / self.broken if self.broken else None,
            "absolute": {labels_abs[k]: int(c) for k, c in enumerate(self.absolute.tolist()) if c},
            "relative": {labels_rel[k]: int(c) for k, c in enumerate(self.relative.tolist())},
        }


@dataclass
class RatioStats:
    """Everything `inspect-ratios` reports, accumulated batch by batch."""

    eps_low: float = 0.2
    eps_high: float = 0.2
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    worst_k: int = 0
    detail: bool = True  # position bins, first breaks and worst sequences (inspect-ratios only)
    n_sequences: int = 0
    summaries: dict[str, Summary] = field(init=False)
    sums: dict[str, float] = field(default_factory=lambda: {"k1": 0.0, "k3": 0.0, "m2": 0.0})
    clipped: dict[str, list[int]] = field(default_factory=lambda: {"token_ratio": [0, 0], "minpro_weight": [0, 0]})
    sequence_weight: Summary = field(init=False)  # ρ_1:|o|, the exact weight of a whole response
    absolute: PositionBins = field(default_factory=lambda: PositionBins(MAX_LOG_BIN))
    relative: PositionBins = field(default_factory=lambda: PositionBins(RELATIVE_BINS))
    breaks: list[FirstBreaks] = field(init=False)
    worst: list[tuple[float, int, dict[str, Any]]] = field(default_factory=list)  # max-heap on −min log ρ
    _order: itertools.count = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.summaries = {k: Summary(self.thresholds) for k in QUANTITIES}
        self.sequence_weight = Summary(())
        self.breaks = [FirstBreaks(t) for t in self.thresholds if t < 1.0]

    def add(self, log_rho: torch.Tensor, mask: torch.Tensor, rows: list[RolloutRow] | None = None,
            source: str | None = None) -> None:
        """One batch: (B, T) clamped token log-ratios and the mask of trained tokens; `rows` (for
        the worst-sequence list) are the batch's rows, read from the file named `source`."""
        mask = mask.bool()
        quantities = log_quantities(log_rho, mask)
        for key, summary in self.summaries.items():
            summary.add(quantities[key][mask])
        lr = quantities["token_ratio"][mask]
        self.sums["k1"] += float((-lr).sum())
        self.sums["k3"] += float((lr.exp() - 1 - lr).sum())
        self.sums["m2"] += float((lr**2).sum())
        low, high = 1.0 - self.eps_low, 1.0 + self.eps_high
        for key in self.clipped:
            values = quantities[key][mask].exp()
            self.clipped[key][0] += int((values < low).sum())
            self.clipped[key][1] += int((values > high).sum())
        has_tokens = mask.any(-1)
        self.n_sequences += int(has_tokens.sum())
        # ρ_1:t is constant after the last trained token, so the row's final value is its last column
        self.sequence_weight.add(quantities["prefix_ratio"][:, -1][has_tokens])
        if not self.detail:  # train's per-update statistics stop here: nothing below is on its hot path
            return
        length = mask.sum(-1)
        position = mask.long().cumsum(-1) - 1  # index among trained tokens
        flat_pos = position[mask]
        rel = (flat_pos.double() / length[:, None].expand_as(position)[mask] * RELATIVE_BINS).long()
        args = (lr, quantities["prefix_ratio"][mask], quantities["min_prefix_ratio"][mask])
        self.absolute.add(absolute_bin(flat_pos), *args)
        self.relative.add(rel.clamp(max=RELATIVE_BINS - 1), *args)
        for breaks in self.breaks:
            breaks.add(quantities["min_prefix_ratio"], mask, position, length.double())
        if self.worst_k and rows is not None:
            self._track_worst(quantities["token_ratio"], mask, rows, length, source)

    def _track_worst(self, log_rho: torch.Tensor, mask: torch.Tensor, rows: list[RolloutRow],
                     length: torch.Tensor, source: str | None) -> None:
        end_min, where = log_rho.masked_fill(~mask, math.inf).min(-1)
        for i in torch.argsort(end_min)[: self.worst_k].tolist():
            if not bool(mask[i].any()):
                continue
            value = float(end_min[i])
            if len(self.worst) == self.worst_k and -self.worst[0][0] <= value:
                break
            column = int(where[i])
            position = int(mask[i, : column + 1].sum()) - 1
            row = rows[i]
            item = {
                "prompt_id": row.prompt_id,
                "sample_index": row.sample_index,
                "reward": row.reward,
                "policy_version": row.policy_version,
                "source": source,
                "min_ratio": math.exp(value),
                "position": position + 1,
                "response_length": int(length[i]),
                "token_ids": list(row.response_token_ids),
            }
            heapq.heappush(self.worst, (-value, next(self._order), item))
            if len(self.worst) > self.worst_k:
                heapq.heappop(self.worst)

    def n_tokens(self) -> int:
        return self.summaries["token_ratio"].count

    def report(self) -> dict[str, Any]:
        n = max(self.n_tokens(), 1)
        out: dict[str, Any] = {key: s.report() for key, s in self.summaries.items()}
        out |= {
            "n_sequences": self.n_sequences,
            "n_tokens": self.n_tokens(),
            "kl_k1": self.sums["k1"] / n,
            "kl_k3": self.sums["k3"] / n,
            "m2": self.sums["m2"] / n,
            "clip": {
                "eps_low": self.eps_low,
                "eps_high": self.eps_high,
                **{
                    key: {"low": lo / n, "high": hi / n, "total": (lo + hi) / n}
                    for key, (lo, hi) in self.clipped.items()
                },
            },
            "ess": {**{key: s.ess() for key, s in self.summaries.items()}, "sequence": self.sequence_weight.ess()},
        }
        if self.detail:
            out["by_position"] = {
                "absolute": self.absolute.report(absolute_bin_labels()),
                "relative": self.relative.report(relative_bin_labels()),
            }
            out["first_break"] = {str(b.tau): b.report() for b in self.breaks}
            out["worst"] = [item for _, _, item in sorted(self.worst, key=lambda e: (-e[0], e[1]))]
        return out


STEP_QUANTILES = (0.05, 0.5, 0.95)


def quantiles(values: torch.Tensor) -> torch.Tensor:
    """STEP_QUANTILES of a 1-d tensor, linearly interpolated between order statistics (as
    `torch.quantile`, which refuses more than 2^24 values)."""
    ordered = values.sort().values
    position = torch.tensor(STEP_QUANTILES, dtype=torch.float64, device=values.device) * (len(ordered) - 1)
    low = position.floor().long()
    high = position.ceil().long()
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class StepRatios:
    """One optimizer step's ratio statistics, the per-update figures `minpro train` logs: the
    trained tokens' log-ratios stay on the device, micro-batch by micro-batch, and `tensors()`
    reduces them once per step (exact quantiles: a step's tokens fit in memory many times over;
    `RatioStats` streams and histograms for `inspect-ratios`, which reads whole runs)."""

    logs: dict[str, list[torch.Tensor]] = field(default_factory=lambda: {key: [] for key in QUANTITIES})
    sequences: list[torch.Tensor] = field(default_factory=list)  # log ρ_1:|o| of each response

    def add(self, log_rho: torch.Tensor, mask: torch.Tensor) -> None:
        mask = mask.bool()
        quantities = log_quantities(log_rho, mask)
        for key, parts in self.logs.items():
            parts.append(quantities[key][mask])
        self.sequences.append(quantities["prefix_ratio"][:, -1][mask.any(-1)])

    def tensors(self) -> dict[str, torch.Tensor]:
        """0-d float64 tensors on the device, keyed as in metrics.jsonl (empty for no tokens)."""
        out: dict[str, torch.Tensor] = {}
        for key, parts in self.logs.items():
            logs = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
            if logs.numel() == 0:
                return {}
            values = logs.clamp(max=700.0).exp()
            out |= {f"ratios/{key}_mean": values.mean(), f"ratios/{key}_min": values.min(),
                    f"ratios/{key}_max": values.max(), f"ratios/{key}_below_0.5_frac": (values < 0.5).double().mean()}
            out |= {f"ratios/{key}_p{round(q * 100)}": v for q, v in zip(STEP_QUANTILES, quantiles(logs).exp())}
        log_rho = torch.cat(self.logs["token_ratio"])
        weights = torch.cat(self.sequences).clamp(max=700.0).exp()
        out |= {
            "ratios/kl_k1": (-log_rho).mean(),
            "ratios/kl_k3": (log_rho.exp() - 1 - log_rho).mean(),
            "ratios/m2": (log_rho**2).mean(),
            "ratios/ess_sequence": weights.mean() ** 2 / (weights**2).mean(),  # (Σw)² / (n Σw²)
        }
        return out
