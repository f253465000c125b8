"""Write docs/results/precision.md: does bf16 sampling + bf16 training change what a run learns?

    .venv/bin/python scripts/study_precision.py [--recipes quickstart,smollm2-rl] [--seeds 3] [--no-train]

Each recipe is trained as it ships (float32) and with bf16: the `hf` sampler's own bf16 copy of
the weights (`sampler.options.dtype`), bf16 autocast training (`model.dtype`), and the
correction layer's recommendation for a sampler that is not the trainer (`train.anchor:
sampling_weights` + token TIS, verl's default). Seeds are paired: a seed's two runs share the
starting weights, prompts and evaluation problems. Reported: held-out pass@1 before and after,
the paired difference bf16 − float32 with a t-interval over seeds, wall time per run, and the
mismatch the bf16 runs logged per round. A finished run leaves a small record (pass@1, wall time,
per-round curves) under docs/results/precision/records/, to commit: a rerun, even on a fresh machine,
trains only the runs without one, and `minpro train` resumes an interrupted one under --work.
`--no-train` writes the page from the records alone, with the seeds whose two runs both have one
(a study cut short). smollm2-rl needs `bash scripts/setup_smollm2.sh`.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from study_mismatch import T975, average_curves, mean_curve, mean_se

from minpro_cli.fileio import write_json_atomic, write_text_atomic
from minpro_cli.hardware import cpu_name, native_bf16

ROOT = Path(__file__).resolve().parent.parent
ARMS = {
    "float32": [],
    "bf16 + sampling_weights + token TIS": [
        "model.dtype=bfloat16", "sampler.options.dtype=bfloat16", "train.anchor=sampling_weights",
        "correction.level=token",
    ],
}  # fmt: skip
MISMATCH = ("mismatch/kl_k3", "mismatch/log_ppl_abs_diff", "correction/truncated_frac")  # ≥ 0: a log scale
CURVES = ("reward_mean", "mismatch/kl_k1", *MISMATCH)  # what a run's record keeps of its metrics.jsonl


def run_dir(work: Path, recipe: str, arm: str, seed: int) -> Path:
    return work / recipe / f"{arm.split()[0]}_seed{seed}"


def train(recipe: str, arm: str, seed: int, run: Path, record: Path) -> dict:
    """One run's evaluations, per-round curves and wall time: from its committed record if there is one,
    else trained (resumed if interrupted) and recorded, so a later session on a fresh machine keeps it."""
    if record.exists():
        return json.loads(record.read_text())
    timing = run / "wall_seconds.json"
    if not (run / "final" / "model.safetensors").exists():
        resumed = run.exists()  # started before: its wall time would not be that of one run, so left out
        print(f"{recipe}: {arm}, seed {seed}" + (" (resumed)" if resumed else ""), flush=True)
        started = time.perf_counter()
        iterations = load_iterations(recipe)
        subprocess.run([sys.executable, "-m", "minpro_cli", "train", str(ROOT / "recipes" / f"{recipe}.yaml"),
                        f"run_dir={run}", f"seed={seed}", f"train.eval_every={iterations}", *ARMS[arm]],
                       check=True)  # fmt: skip
        if not resumed:
            write_json_atomic(timing, {"seconds": time.perf_counter() - started})
    evals = [json.loads(line) for line in (run / "evals.jsonl").read_text().splitlines() if line.strip()]
    result = {"before": evals[0]["eval/pass@1"], "after": evals[-1]["eval/pass@1"], "cpu": cpu_name(),
              "native_bf16": native_bf16("cpu"),
              "seconds": json.loads(timing.read_text())["seconds"] if timing.exists() else None,
              "curves": {key: mean_curve([run], key) for key in CURVES}}  # fmt: skip
    record.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(record, result)
    return result


def load_iterations(recipe: str) -> int:
    from minpro_cli.config import load_recipe

    return load_recipe(ROOT / "recipes" / f"{recipe}.yaml", []).train.iterations


def arm_row(arm: str, results: list[dict]) -> str:
    after, se = mean_se([r["after"] for r in results])
    minutes = [r["seconds"] / 60 for r in results if r["seconds"]]
    kl = [value for r in results for value in r["curves"]["mismatch/kl_k1"]]
    cells = [arm, str(len(results)), f"{statistics.fmean(r['before'] for r in results):.3f}", f"{after:.3f} ± {se:.3f}" if len(results) > 1 else f"{after:.3f}",
             ", ".join(f"{r['after']:.3f}" for r in results), f"{statistics.median(minutes):.1f}" if minutes else "–",
             f"{statistics.fmean(kl):.1e}" if kl else "–"]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def section(recipe: str, runs: dict[str, list[dict]]) -> list[str]:
    """One recipe's table and reading: pass@1, the paired difference, time, mismatch."""
    header = ("| arm | seeds | pass@1 before | after (mean ± s.e.) | per seed | minutes per run (median) | "
              "mean per-round mismatch/kl_k1 |")  # fmt: skip
    lines = [f"## {recipe}", "", header, "|---|---|---|---|---|---|---|"]
    lines += [arm_row(arm, results) for arm, results in runs.items()]
    cpus = collections.Counter(r.get("cpu") or "not recorded" for results in runs.values() for r in results)
    lines += ["", "Runs by CPU: " + ", ".join(f"{name} ({count})" for name, count in cpus.items()) + "."]
    fp32, bf16 = (runs[arm] for arm in ARMS)
    if len(fp32) == len(bf16) > 1:
        mean, se = mean_se([b["after"] - f["after"] for f, b in zip(fp32, bf16)])
        half = T975[len(fp32) - 1] * se
        verdict = ("bf16 is better" if mean > half else "bf16 is worse: a speed-up that costs accuracy" if mean < -half
                   else "does not separate")  # fmt: skip
        gain = statistics.fmean(f["after"] - f["before"] for f in fp32)
        spread = statistics.stdev(f["after"] for f in fp32)
        lines += ["", (f"Paired difference bf16 − float32 over {len(fp32)} seeds: **{mean:+.3f}** (95% CI "
                       f"[{mean - half:+.3f}, {mean + half:+.3f}]): {verdict}. For scale: float32 training moved "
                       f"held-out pass@1 by {gain:+.3f} on average, and its seeds' results spread with s.d. "
                       f"{spread:.3f}; a difference much smaller than the interval's half-width ({half:.3f}) "
                       "cannot be seen with these seeds.")]  # fmt: skip
    return lines + [""]


def figure(recipe: str, runs: dict[str, list[dict]], out: Path) -> None:
    """Training reward by round for both arms, and the bf16 arm's mismatch per round (means over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (reward, mismatch) = plt.subplots(1, 2, figsize=(11, 4))
    for arm, results in runs.items():
        reward.plot(average_curves([r["curves"]["reward_mean"] for r in results]), label=arm)
        for key in MISMATCH:
            if curve := average_curves([r["curves"][key] for r in results]):
                mismatch.plot(curve, label=f"{key} ({arm.split()[0]})")
    seeds = len(next(iter(runs.values())))
    reward.set(xlabel="round", ylabel=f"training reward (mean of {seeds} seeds)", title=recipe)
    mismatch.set(xlabel="round", yscale="log", title="sampler–trainer mismatch, mean per round")
    reward.legend(fontsize=8)
    mismatch.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="quickstart,smollm2-rl")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=ROOT / "runs/study-precision")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results/precision.md")
    parser.add_argument("--no-train", action="store_true", help="the page from the records alone: whole pairs only")
    args = parser.parse_args()
    text = ["# bf16 sampling and training against float32: held-out pass@1, paired by seed", "",
            ("Made by `scripts/study_precision.py` (2 CPU cores); the bf16 arm is `model.dtype: bfloat16`, "
             "`sampler.options.dtype: bfloat16`, `train.anchor: sampling_weights`, `correction.level: token`. "
             "Minutes per run are wall time, left out for resumed runs; runs are not interleaved and may share "
             "the machine with other work, so `benchmarks/vs_trl.py` is where speed is measured."), ""]
    notes = args.out.with_suffix(".notes.md")  # the reading, written by hand once the numbers are in
    text += [notes.read_text().strip(), ""] if notes.exists() else []
    for recipe in args.recipes.split(","):
        runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
        for seed in range(args.seeds):  # seed by seed, so a study cut short still has whole pairs
            records = {arm: args.out.with_suffix("") / "records" / recipe / f"{arm.split()[0]}_seed{seed}.json"
                       for arm in ARMS}  # fmt: skip
            if args.no_train and not all(record.exists() for record in records.values()):
                continue
            for arm, record in records.items():
                runs[arm].append(train(recipe, arm, seed, run_dir(args.work, recipe, arm, seed), record))
        if not runs["float32"]:
            continue
        picture = args.out.with_suffix("") / f"{recipe}.png"
        figure(recipe, runs, picture)
        text += section(recipe, runs) + [f"![{recipe}: reward and mismatch]({args.out.stem}/{picture.name})", ""]
    write_text_atomic(args.out, "\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
