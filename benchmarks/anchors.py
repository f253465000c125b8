"""Time and peak memory of one round's update under each `train.anchor`, side by side in one run.

    .venv/bin/python benchmarks/anchors.py --model runs/smollm2/model [--responses 16] [--repeats 3]
    .venv/bin/python benchmarks/anchors.py --vocab 49152          # random-init SmolLM2-shaped model

`behavior` and `loglinear` need no forward beyond the step's own; `round_start` and
`sampling_weights` rescore the round's rows with the trainer's own no-grad forward (a plain
copy of the policy loaded with the weights, micro-batches of the trainer's budget, the chunked
head), and `factor_metrics` adds the other one. Each measurement is what `minpro train` does
per round with one optimizer step: the rescoring (weights loaded into the copy) plus the step
(MinPRO, AdamW, micro-batches of 4096 tokens, activation checkpointing), in a fresh forked
process; configurations interleaved, min/median/max of the repeats. Check `uptime` first.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
from common import Measurement, measure
from memory import build_model, minibatch, spread

from minpro_cli.anchors import OffPolicy, Rescorer
from minpro_cli.correction import CorrectionConfig
from minpro_cli.distributed import SINGLE
from minpro_cli.modeling import Policy
from minpro_cli.objectives.minpro import MinPRO
from minpro_cli.step import Trainee, update_step

CONFIGS = {
    "behavior": OffPolicy(),
    "loglinear": OffPolicy("loglinear", CorrectionConfig(level="token")),
    "round_start": OffPolicy("round_start", CorrectionConfig(level="token")),
    "sampling_weights": OffPolicy("sampling_weights", CorrectionConfig(level="token")),
    "both (factor_metrics)": OffPolicy("sampling_weights", CorrectionConfig(level="token"), factor_metrics=True),
}


def round_update(name: str, args: argparse.Namespace) -> Callable[[], tuple[float, int]]:
    def run() -> tuple[float, int]:
        model = build_model(args.vocab, args.model)
        batch = minibatch(args.responses, model.config.vocab_size, args.response_tokens)
        batch.versions = [0] * len(batch.prompts)
        off = CONFIGS[name]
        tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=0)  # the rescorer only pads with it
        rescorer = Rescorer(Policy(model, tokenizer, Path(""), torch.float32), 4096) if off.needs() else None  # type: ignore[arg-type]
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        trainee = Trainee(model, 0, SINGLE, micro_batch_tokens=4096)
        started = time.perf_counter()
        if rescorer is not None:
            for key in sorted(off.needs()):  # a stale row's weights differ from the round start's: one forward each
                weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
                batch.scores[key] = rescorer.score(weights, batch.prompts, batch.responses, 1.0)
        model.train()
        update_step(trainee, optimizer, MinPRO(), batch, grad_clip=1.0, off_policy=off, version=1)
        tokens = sum(len(p) + len(r) for p, r in zip(batch.prompts, batch.responses))
        return time.perf_counter() - started, tokens

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a local checkpoint instead of the random-init model")
    parser.add_argument("--vocab", type=int, default=49_152, help="vocabulary of the random-init model")
    parser.add_argument("--responses", type=int, default=16)
    parser.add_argument("--response-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[Measurement]] = {c: [] for c in CONFIGS}
    for repeat in range(args.repeats):
        for name in CONFIGS:
            m = measure(round_update(name, args))
            results[name].append(m)
            print(f"  repeat {repeat + 1}: {name:22s} {m.seconds:6.2f} s, {m.peak_mb:6.0f} MB", flush=True)
    model = args.model or f"random-init Llama, vocabulary {args.vocab}"
    print(f"\none round (rescoring + one optimizer step), {model}, {args.responses} responses of "
          f"~{args.response_tokens} tokens; {torch.get_num_threads()} threads; min/median/max of {args.repeats}")
    print(f"{'':22s} | {'seconds':>20} | {'peak MB':>17}")
    for name, ms in results.items():
        print(f"{name:22s} | {spread([m.seconds for m in ms], '.2f'):>20} | {spread([m.peak_mb for m in ms], '.0f'):>17}")


if __name__ == "__main__":
    main()
