"""One RL step, minpro vs TRL's GRPOTrainer: same weights, prompts, reward and shape, in one run.

Workload per step: 32 prompts × 8 samples, at most 64 new tokens, T = 1, top-k 0, top-p 1,
math-verify reward, one optimizer update (AdamW, lr 1e-5), on three models: the embedded
model, and random-init Qwen2 models of 4.46M and 33.7M parameters with a 1024-token BPE
vocabulary (`qwen2_models.py`, built deterministically). minpro runs its defaults (the
`minpro train` step: sample_rows → advantages → update_policy); TRL 1.16 runs with gradient
checkpointing off, like minpro, and no KL term.

Each side runs in its own fresh process: 1 warm-up step (not counted; with `--compile` it also
pays the compile), then `--steps` timed
steps, of which the median is that run's figure. Sides and models are interleaved, and the
order of the two sides alternates between runs. Per side: step time split into generation
(sampling + reward + advantages) and training, useful and padded training tokens, peak RSS,
and MFU: useful FLOPs (2·N per token sampled or prompt-filled, 6·N per token trained, N =
parameters; attention's own FLOPs left out) over step time × the fp32 matmul peak measured
at the start of the run.

    bash benchmarks/setup_trl_env.sh               # TRL lives only in benchmarks/.venv-trl
    benchmarks/.venv-trl/bin/python benchmarks/vs_trl.py [--runs 3] [--models embedded,qwen2-4.5m,qwen2-34m]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import GROUP_SIZE, MAX_NEW_TOKENS, N_PROMPTS
from qwen2_models import SHAPES, build, parameters

from minpro_cli.modeling import embedded_model_dir

LR, SEED = 1e-5, 0
COMPILED = "minpro+compile"  # train.compile=true
MODELS_DIR = Path(__file__).resolve().parents[1] / "runs" / "bench-models"


def model_dir(name: str) -> Path:
    return embedded_model_dir() if name == "embedded" else build(name, MODELS_DIR / name)


def matmul_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    """Best fp32 matmul FLOP/s of this process's threads: the MFU denominator."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best


def _timed(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def minpro_side(directory: str, steps: int, compiled: bool = False) -> dict[str, list[float]]:
    from minpro_cli.config import recipe_from_data
    from minpro_cli.modeling import compile_blocks, load_policy
    from minpro_cli.sampling import Plugins, load_split, sample_rows, sampling_job
    from minpro_cli.step import Trainee, micro_batches, training_batch, update_policy

    recipe = recipe_from_data(
        {"model": {"path": directory}, "sampler": {"name": "hf", "options": {"max_new_tokens": MAX_NEW_TOKENS}},
         "optim": {"lr": LR}, "train": {"compile": compiled}},
        "benchmark",
    )
    policy = load_policy(directory)
    plugins = Plugins.of(recipe)
    job = sampling_job(recipe, policy, plugins)
    problems = load_split(recipe, "train")[:N_PROMPTS]
    objective = plugins.objective
    if recipe.train.compile:  # as `minpro train` does; the warm-up step pays the compile
        compile_blocks(policy.model)
    trainee = Trainee.of(policy, recipe.train.micro_batch_tokens)
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=LR)
    out: dict[str, list[float]] = {k: [] for k in ("generation", "training", "useful", "padded")}
    for step in range(steps + 1):
        started = time.perf_counter()
        rows, _ = sample_rows(job, problems, GROUP_SIZE, seed=SEED + step)
        batch = training_batch(rows, "grpo", False)
        generated = time.perf_counter()
        update_policy(trainee, optimizer, objective, batch, 1, 1, recipe.optim.grad_clip, seed=step)
        trained = time.perf_counter()
        if step == 0:
            continue  # warm-up
        prompts = [len(p) for p in batch.prompts]
        responses = [len(r) for r in batch.responses]
        cuts = micro_batches(prompts, responses, trainee.micro_batch_tokens)
        out["generation"].append(generated - started)
        out["training"].append(trained - generated)
        out["useful"].append(sum(prompts) + sum(responses))
        out["padded"].append(sum(len(c) * (max(prompts[i] for i in c) + max(max(responses[i] for i in c), 1))
                                 for c in cuts))
    return out


def trl_side(directory: str, steps: int) -> dict[str, list[float]]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from minpro_cli.tasks import load_problems
    from minpro_cli.verifiers.math import MathVerifier

    problems = load_problems("embedded:arith-train")[:N_PROMPTS]
    data = Dataset.from_list([{"prompt": f"{p.question}\n", "answer": p.answer} for p in problems] * (steps + 1))
    verifier = MathVerifier()

    def reward(completions: list[str], answer: list[str], **_: Any) -> list[float]:
        return [verifier(c, a).reward for c, a in zip(completions, answer)]

    out: dict[str, list[float]] = {k: [] for k in ("generation", "training", "useful", "padded")}
    step_started: list[float] = []

    class TimedGRPO(GRPOTrainer):  # type: ignore[misc]
        def _generate_and_score_completions(self, inputs: Any) -> Any:
            step_started.append(time.perf_counter())
            result = super()._generate_and_score_completions(inputs)
            out["generation"].append(time.perf_counter() - step_started[-1])
            prompt, completion = result["prompt_mask"], result["completion_mask"]
            useful = int(prompt.sum() + completion.sum())
            out["useful"].append(useful)
            out["padded"].append(prompt.numel() + completion.numel())
            return result

        def optimizer_step_done(self) -> None:
            out["training"].append(time.perf_counter() - step_started[-1] - out["generation"][-1])

    with tempfile.TemporaryDirectory() as tmp:
        config = GRPOConfig(
            output_dir=tmp, per_device_train_batch_size=N_PROMPTS * GROUP_SIZE, num_generations=GROUP_SIZE,
            max_completion_length=MAX_NEW_TOKENS, temperature=1.0, top_k=0, top_p=1.0, learning_rate=LR,
            beta=0.0, num_iterations=1, max_steps=steps + 1, use_cpu=True, report_to="none",
            save_strategy="no", logging_steps=1, bf16=False, disable_tqdm=True, seed=SEED,
            gradient_checkpointing=False, shuffle_dataset=False,
        )
        model = AutoModelForCausalLM.from_pretrained(directory, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        trainer = TimedGRPO(model=model, reward_funcs=reward, args=config, train_dataset=data, processing_class=tokenizer)
        from transformers import TrainerCallback

        class StepEnd(TrainerCallback):  # type: ignore[misc]
            def on_step_end(self, *args: Any, **kwargs: Any) -> None:
                trainer.optimizer_step_done()

        trainer.add_callback(StepEnd())
        trainer.train()
    return {key: values[1:] for key, values in out.items()}  # drop the warm-up step


def _child(side: str, directory: str, steps: int, queue: mp.Queue) -> None:
    if side == "trl":
        result = trl_side(directory, steps)
    else:
        result = minpro_side(directory, steps, compiled=side == COMPILED)
    result["peak_mb"] = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]
    queue.put(result)


def run_side(side: str, directory: Path, steps: int) -> dict[str, list[float]]:
    """One side's steps in a fresh interpreter (spawn): its peak memory is its own."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(side, str(directory), steps, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return "/".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run, after one warm-up step")
    parser.add_argument("--models", default=",".join(["embedded", *SHAPES]))
    parser.add_argument("--compile", action="store_true", help=f"also run minpro with train.compile=true ({COMPILED})")
    args = parser.parse_args()
    names = args.models.split(",")
    peak = matmul_peak_flops()
    print(f"{N_PROMPTS} prompts x {GROUP_SIZE} samples, <= {MAX_NEW_TOKENS} new tokens, T=1; "
          f"{torch.get_num_threads()} threads; fp32 matmul peak {peak / 1e9:.0f} GFLOP/s")
    params = {}
    for name in names:
        params[name] = parameters(model_dir(name))
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    for r in range(args.runs):
        for name in names:
            sides = ["minpro", "trl", *([COMPILED] if args.compile else [])]
            sides = sides if r % 2 == 0 else sides[::-1]
            for side in sides:
                result = run_side(side, model_dir(name), args.steps)
                summary = {key: statistics.median(values) for key, values in result.items()}
                summary["step"] = statistics.median(g + t for g, t in zip(result["generation"], result["training"]))
                flops = 8 * params[name] * summary["useful"]  # each token sampled (2·N) and trained (6·N)
                summary["mfu"] = flops / summary["step"] / peak
                runs.setdefault((name, side), []).append(summary)
                print(f"run {r + 1} {name:11s} {side:14s} step {summary['step']:6.2f} s  generation "
                      f"{summary['generation']:6.2f} s  training {summary['training']:6.2f} s  "
                      f"peak {summary['peak_mb']:6.0f} MB", flush=True)
    print("\nmin/median/max over runs; ratios are minpro / TRL within each run")
    header = f"{'model':11s} {'minpro':14s} {'params':>7s} {'step ratio':>16s} {'generation':>16s} {'training':>16s}"
    print(header + f" {'minpro s/step':>17s} {'TRL s/step':>17s} {'MFU minpro/TRL':>15s} {'peak MB minpro/TRL':>19s}"
          f" {'padded/useful tok minpro | TRL':>32s}")
    for name in names:
        for side in ["minpro", *([COMPILED] if args.compile else [])]:
            print(table_row(f"{name:11s} {side:14s}", params[name], runs[(name, side)], runs[(name, "trl")]))


def table_row(name: str, params: int, ours: list[dict[str, float]], theirs: list[dict[str, float]]) -> str:
    def ratio(key: str) -> str:
        return spread([o[key] / t[key] for o, t in zip(ours, theirs)])

    def med(side: list[dict[str, float]], key: str) -> float:
        return statistics.median(s[key] for s in side)

    return (
        f"{name} {params / 1e6:6.2f}M {ratio('step'):>16s} {ratio('generation'):>16s} {ratio('training'):>16s} "
        f"{spread([o['step'] for o in ours]):>17s} {spread([t['step'] for t in theirs]):>17s} "
        f"{med(ours, 'mfu'):6.1%}/{med(theirs, 'mfu'):6.1%} {med(ours, 'peak_mb'):8.0f}/{med(theirs, 'peak_mb'):<8.0f}"
        f"  {med(ours, 'padded'):6.0f}/{med(ours, 'useful'):<6.0f} | {med(theirs, 'padded'):6.0f}/{med(theirs, 'useful'):<6.0f}"
    )


if __name__ == "__main__":
    main()
