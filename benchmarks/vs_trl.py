"""One RL step, minpro vs TRL's GRPOTrainer, same weights and workload, in one run.

Workload: the embedded model, 32 prompts x 8 samples, max 64 new tokens, T = 1, top-k 0,
top-p 1, math-verify reward, one optimizer update. Each side runs 3 steps in its own
process; the median step time is reported, with peak memory.

    bash benchmarks/setup_trl_env.sh               # TRL lives only in benchmarks/.venv-trl
    benchmarks/.venv-trl/bin/python benchmarks/vs_trl.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import GROUP_SIZE, MAX_NEW_TOKENS, N_PROMPTS, measure

from minpro_cli.collect import SamplingJob, sample_rows
from minpro_cli.modeling import embedded_model_dir, load_policy
from minpro_cli.objectives.minpro import MinPRO
from minpro_cli.samplers.hf import HFSampler
from minpro_cli.tasks import load_problems
from minpro_cli.train import Trainee, training_batch, update_step
from minpro_cli.verifiers.math import MathVerifier

STEPS, LR = 3, 1e-5


def minpro_steps() -> tuple[float, int]:
    policy = load_policy("embedded")
    problems = load_problems("embedded:arith-train")[:N_PROMPTS]
    job = SamplingJob(policy, HFSampler(max_new_tokens=MAX_NEW_TOKENS), "hf", MathVerifier(), "math", "{question}\n")
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=LR)
    times = []
    for step in range(STEPS):
        started = time.perf_counter()
        rows, _ = sample_rows(job, problems, GROUP_SIZE, seed=step)
        policy.model.train()
        update_step(Trainee.of(policy), optimizer, MinPRO(), training_batch(rows, "grpo", False), grad_clip=1.0)
        policy.model.eval()
        times.append(time.perf_counter() - started)
    return statistics.median(times), 0


def trl_steps() -> tuple[float, int]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    problems = load_problems("embedded:arith-train")[:N_PROMPTS]
    data = Dataset.from_list([{"prompt": f"{p.question}\n", "answer": p.answer} for p in problems])
    verifier = MathVerifier()

    def reward(completions, answer, **_):
        return [verifier(c, a).reward for c, a in zip(completions, answer)]

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            times.append(time.perf_counter() - self.started)

    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out, per_device_train_batch_size=N_PROMPTS * GROUP_SIZE, num_generations=GROUP_SIZE,
            max_completion_length=MAX_NEW_TOKENS, temperature=1.0, top_k=0, top_p=1.0, learning_rate=LR,
            beta=0.0, num_iterations=1, max_steps=STEPS, use_cpu=True, report_to="none",
            save_strategy="no", logging_steps=1, bf16=False, disable_tqdm=True, seed=0,
        )
        model = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=data,
                              processing_class=tokenizer, callbacks=[StepTimer()])
        trainer.train()
    return statistics.median(times), 0


def main() -> None:
    print(f"one RL step: embedded model, {N_PROMPTS} prompts x {GROUP_SIZE} samples, max {MAX_NEW_TOKENS} "
          f"new tokens, T=1, top-k 0, top-p 1, {torch.get_num_threads()} threads; median of {STEPS} steps")
    ours, theirs = measure(minpro_steps), measure(trl_steps)
    print(f"{'':24s} {'s/step':>8s} {'peak MB':>9s}")
    print(f"{'minpro':24s} {ours.seconds:8.2f} {ours.peak_mb:9.0f}")
    print(f"{'TRL GRPOTrainer':24s} {theirs.seconds:8.2f} {theirs.peak_mb:9.0f}")
    print(f"minpro / TRL step time: {ours.seconds / theirs.seconds:.2f}  (target <= 0.5)")


if __name__ == "__main__":
    main()
