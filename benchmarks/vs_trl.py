"""One RL step, minpro vs TRL's GRPOTrainer: same weights, prompts, reward and shape, in one run.

Workload per step: 32 prompts × 8 samples, at most 64 new tokens, T = 1, top-k 0, top-p 1,
math-verify reward, one optimizer update (AdamW, lr 1e-5), on four models: the embedded
model, random-init Qwen2 models of 4.46M and 33.7M parameters with a 1024-token BPE
vocabulary (`qwen2_models.py`, built deterministically), and SmolLM2-135M-Instruct (a 49k
vocabulary and real EOS behaviour; `scripts/setup_smollm2.sh`). TRL 1.16 runs with gradient
checkpointing off, like minpro, and no KL term.

Sides (`--sides`): minpro in float32, with bf16 sampling + bf16 autocast training
(`minpro-bf16`), each also with `train.compile` (`+compile`); TRL in float32, with
`bf16=True`, and with the model loaded in bf16 (`trl-bf16-model`). Each side runs in its own
fresh process: 1 warm-up step (not counted; it also pays a compile), then `--steps` timed
steps, of which the median is that run's figure. Sides are interleaved, their order reversed
every other run. Per side: step time split into generation (sampling + reward + advantages)
and training, useful and padded training tokens, mean response length, peak RSS, the share of
weights the last update changed (an update lost to bf16 rounding does not train), and MFU:
useful FLOPs (2·N per token sampled or prompt-filled, 6·N per token trained, N = parameters;
attention's own FLOPs left out) over step time × the fp32 and the bf16 matmul peaks measured
at the start of the run.

    bash benchmarks/setup_trl_env.sh               # TRL lives only in benchmarks/.venv-trl
    benchmarks/.venv-trl/bin/python benchmarks/vs_trl.py [--runs 3] [--steps 1] [--models qwen2-34m,smollm2] [--sides …]
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
MODELS_DIR = Path(__file__).resolve().parents[1] / "runs" / "bench-models"
SMOLLM2 = Path(__file__).resolve().parents[1] / "runs" / "smollm2" / "model"  # scripts/setup_smollm2.sh
# side → its settings. minpro: (train.compile, bf16 sampling + autocast training);
# TRL: (GRPOConfig.bf16, model loaded in bf16)
MINPRO = {"minpro": (False, False), "minpro-bf16": (False, True),
          "minpro+compile": (True, False), "minpro-bf16+compile": (True, True)}
TRL = {"trl": (False, False), "trl-bf16": (True, False), "trl-bf16-model": (True, True)}
# Where the whole batch's activations would not fit in memory (23 GB here): TRL's per-device
# batch, with gradient accumulation over the rest, and minpro's micro-batch budget in tokens
# (its default, 16384, elsewhere: a 24576-token budget trains 50% slower at 33.7M)
TRL_ROWS = {"smollm2": 64}
MINPRO_TOKENS = {"smollm2": 8192}


def model_dir(name: str) -> Path:
    if name == "smollm2":
        return SMOLLM2
    return embedded_model_dir() if name == "embedded" else build(name, MODELS_DIR / name)


def matmul_peak_flops(dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 20) -> float:
    """Best matmul FLOP/s of this process's threads in `dtype`: an MFU denominator."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best


def _timed(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def changed_fraction(before: list[torch.Tensor], model: torch.nn.Module) -> float:
    """Share of weight elements an update changed: an update lost to rounding does not train."""
    after = list(model.parameters())
    changed = sum(int((a.detach().float() != b.float()).sum()) for a, b in zip(after, before))
    return changed / sum(b.numel() for b in before)


def minpro_side(
    directory: str, steps: int, micro_batch_tokens: int | None, compiled: bool = False, bf16: bool = False
) -> dict[str, list[float]]:
    from minpro_cli.config import recipe_from_data
    from minpro_cli.modeling import compile_blocks, load_policy
    from minpro_cli.sampling import Plugins, load_split, sample_rows, sampling_job
    from minpro_cli.step import Trainee, micro_batches, training_batch, update_policy

    precision = "bfloat16" if bf16 else "float32"
    recipe = recipe_from_data(
        {"model": {"path": directory, "dtype": precision},
         "sampler": {"name": "hf", "options": {"max_new_tokens": MAX_NEW_TOKENS, "dtype": precision}},
         "optim": {"lr": LR},
         "train": {"compile": compiled, **({"micro_batch_tokens": micro_batch_tokens} if micro_batch_tokens else {})}},
        "benchmark",
    )
    policy = load_policy(directory, recipe.model.dtype)
    plugins = Plugins.of(recipe)
    job = sampling_job(recipe, policy, plugins)
    problems = load_split(recipe, "train")[:N_PROMPTS]
    objective = plugins.objective
    if recipe.train.compile:  # as `minpro train` does; the warm-up step pays the compile
        compile_blocks(policy.model)
    trainee = Trainee.of(policy, recipe.train.micro_batch_tokens)
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=LR)
    out: dict[str, list[float]] = {k: [] for k in ("generation", "training", "useful", "padded", "length")}
    before: list[torch.Tensor] = []
    for step in range(steps + 1):
        if step == steps:  # the weights the last update starts from, copied outside the timed phases
            before = [p.detach().clone() for p in policy.model.parameters()]
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
        out["length"].append(sum(responses) / len(responses))
        out["padded"].append(sum(len(c) * (max(prompts[i] for i in c) + max(max(responses[i] for i in c), 1))
                                 for c in cuts))
    out["changed"] = [changed_fraction(before, policy.model)]
    return out


def trl_side(
    directory: str, steps: int, rows: int, bf16: bool = False, bf16_model: bool = False
) -> dict[str, list[float]]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from minpro_cli.tasks import load_problems
    from minpro_cli.verifiers.math import MathVerifier

    problems = load_problems("embedded:arith-train")[:N_PROMPTS]
    data = Dataset.from_list([{"prompt": f"{p.question}\n", "answer": p.answer} for p in problems] * (steps + 1))
    verifier = MathVerifier()

    def reward(completions: list[str], answer: list[str], **_: Any) -> list[float]:
        return [verifier(c, a).reward for c, a in zip(completions, answer)]

    out: dict[str, list[float]] = {k: [] for k in ("generation", "training", "useful", "padded", "length")}
    step_started: list[float] = []
    before: list[torch.Tensor] = []

    class TimedGRPO(GRPOTrainer):  # type: ignore[misc]
        def _generate_and_score_completions(self, inputs: Any) -> Any:
            step_started.append(time.perf_counter())
            result = super()._generate_and_score_completions(inputs)
            out["generation"].append(time.perf_counter() - step_started[-1])
            prompt, completion = result["prompt_mask"], result["completion_mask"]
            out["useful"].append(int(prompt.sum() + completion.sum()))
            out["padded"].append(prompt.numel() + completion.numel())
            out["length"].append(float(completion.sum()) / completion.shape[0])
            copying = time.perf_counter()
            before[:] = [p.detach().clone() for p in self.model.parameters()]
            step_started[-1] += time.perf_counter() - copying  # the copy is not TRL's training time
            return result

    class StepEnd(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            out["training"].append(time.perf_counter() - step_started[-1] - out["generation"][-1])

    with tempfile.TemporaryDirectory() as tmp:
        config = GRPOConfig(
            output_dir=tmp, per_device_train_batch_size=rows, gradient_accumulation_steps=N_PROMPTS * GROUP_SIZE // rows,
            num_generations=GROUP_SIZE, generation_batch_size=N_PROMPTS * GROUP_SIZE,
            max_completion_length=MAX_NEW_TOKENS, temperature=1.0, top_k=0, top_p=1.0, learning_rate=LR,
            beta=0.0, num_iterations=1, max_steps=steps + 1, use_cpu=True, report_to="none",
            save_strategy="no", logging_steps=1, bf16=bf16, disable_tqdm=True, seed=SEED,
            gradient_checkpointing=False, shuffle_dataset=False,
        )
        dtype = torch.bfloat16 if bf16_model else torch.float32
        model = AutoModelForCausalLM.from_pretrained(directory, use_safetensors=True, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        trainer = TimedGRPO(model=model, reward_funcs=reward, args=config, train_dataset=data, processing_class=tokenizer)
        trainer.add_callback(StepEnd())
        trainer.train()
        changed = changed_fraction(before, trainer.model)
    result = {key: values[1:] for key, values in out.items()}  # drop the warm-up step
    result["changed"] = [changed]
    return result


def _child(side: str, name: str, steps: int, queue: mp.Queue) -> None:
    directory = str(model_dir(name))
    if side in TRL:
        result = trl_side(directory, steps, TRL_ROWS.get(name, N_PROMPTS * GROUP_SIZE), *TRL[side])
    else:
        result = minpro_side(directory, steps, MINPRO_TOKENS.get(name), *MINPRO[side])
    result["peak_mb"] = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]
    queue.put(result)


def run_side(side: str, name: str, steps: int) -> dict[str, list[float]]:
    """One side's steps in a fresh interpreter (spawn): its peak memory is its own."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(side, name, steps, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return "/".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


Runs = dict[tuple[str, str], list[dict[str, float]]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run, after one warm-up step")
    parser.add_argument("--models", default=",".join(["embedded", *SHAPES, "smollm2"]))
    parser.add_argument("--sides", default="minpro,minpro-bf16,trl,trl-bf16,trl-bf16-model",
                        help=f"any of {', '.join([*MINPRO, *TRL])}")
    args = parser.parse_args()
    names, sides = args.models.split(","), args.sides.split(",")
    peaks = {"fp32": matmul_peak_flops(torch.float32), "bf16": matmul_peak_flops(torch.bfloat16)}
    print(f"{N_PROMPTS} prompts x {GROUP_SIZE} samples, <= {MAX_NEW_TOKENS} new tokens, T=1; "
          f"{torch.get_num_threads()} threads; matmul peak fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    params = {name: parameters(model_dir(name)) for name in names}
    runs: Runs = {}
    for r in range(args.runs):
        for name in names:
            for side in sides if r % 2 == 0 else sides[::-1]:  # the order alternates between runs
                result = run_side(side, name, args.steps)
                summary = {key: statistics.median(values) for key, values in result.items()}
                summary["step"] = statistics.median(g + t for g, t in zip(result["generation"], result["training"]))
                flops = 8 * params[name] * summary["useful"]  # each token sampled (2·N) and trained (6·N)
                summary.update({f"mfu_{k}": flops / summary["step"] / peak for k, peak in peaks.items()})
                runs.setdefault((name, side), []).append(summary)
                print(f"run {r + 1} {name:11s} {side:20s} step {summary['step']:6.2f} s  generation "
                      f"{summary['generation']:6.2f} s  training {summary['training']:6.2f} s  "
                      f"peak {summary['peak_mb']:6.0f} MB  mean length {summary['length']:5.1f}  "
                      f"weights changed {summary['changed']:.0%}", flush=True)
    report(runs, names, sides, params)


def report(runs: Runs, names: list[str], sides: list[str], params: dict[str, int]) -> None:
    def med(name: str, side: str, key: str) -> float:
        return statistics.median(s[key] for s in runs[(name, side)])

    print("\nper side, min/median/max over runs")
    print(f"{'model':11s} {'side':20s} {'s/step':>17s} {'generation s':>17s} {'training s':>17s} {'MFU fp32/bf16':>14s}"
          f" {'peak MB':>8s} {'length':>6s} {'changed':>7s} {'padded/useful':>14s}")
    for name in names:
        for side in sides:
            ours = runs[(name, side)]
            print(f"{name:11s} {side:20s} {spread([o['step'] for o in ours]):>17s} "
                  f"{spread([o['generation'] for o in ours]):>17s} {spread([o['training'] for o in ours]):>17s} "
                  f"{med(name, side, 'mfu_fp32'):6.1%}/{med(name, side, 'mfu_bf16'):6.1%} "
                  f"{med(name, side, 'peak_mb'):8.0f} {med(name, side, 'length'):6.1f} {med(name, side, 'changed'):7.0%} "
                  f"{med(name, side, 'padded'):6.0f}/{med(name, side, 'useful'):<6.0f}")
    print("\nratios minpro / TRL within each run, min/median/max, against TRL's float32 default and its fastest "
          "side that trains")
    for name in names:
        trl = [s for s in sides if s in TRL]
        changed = {s: med(name, s, "changed") for s in trl}
        fastest = min(training_sides(trl, changed), key=lambda s: med(name, s, "step"))
        for side in (s for s in sides if s in MINPRO):
            for theirs in dict.fromkeys(["trl", fastest]) if "trl" in trl else [fastest]:
                print(f"{name:11s} {params[name] / 1e6:7.2f}M {side:20s} / {theirs:15s}" + "".join(
                    f" {key} {ratio(runs[(name, side)], runs[(name, theirs)], key):>15s}"
                    for key in ("step", "generation", "training")))


def training_sides(trl: list[str], changed: dict[str, float]) -> list[str]:
    """The TRL sides that train: those whose update changed at least half the weights. Where no
    side changed any (every reward 0, so every advantage 0: the random-init models), the update
    cannot tell, and the sides with float32 weights count (a bf16 model loses lr 1e-5 updates)."""
    if any(changed[s] > 0 for s in trl):
        return [s for s in trl if changed[s] >= 0.5]
    return [s for s in trl if not TRL[s][1]]


def ratio(ours: list[dict[str, float]], theirs: list[dict[str, float]], key: str) -> str:
    return spread([o[key] / t[key] for o, t in zip(ours, theirs)])


if __name__ == "__main__":
    main()
