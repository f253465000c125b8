"""Peak memory and tokens/s of one training step: full fine-tuning against LoRA (`model.lora`),
each with and without a KL penalty (`train.kl_coef`), side by side in one run.

    .venv/bin/python benchmarks/lora.py --model runs/smollm2/model [--responses 8] [--repeats 3]
    .venv/bin/python benchmarks/lora.py --vocab 151936              # random-init, Qwen's vocabulary

What `minpro train` holds in each case, beside the step's activations: full fine-tuning the
weights, their gradients and AdamW's two moments (and a frozen reference model for KL); LoRA
the weights, a plain copy that sampling uses (merged weights), and the adapters' gradients and
moments (its KL reference is the same model with the adapters off: nothing more). "held" counts
those tensors' bytes exactly; "peak" is the step's peak resident memory (CPU; GPU: peak
allocated), which adds activations and the allocator's transients. Each measurement is one
optimizer step (MinPRO, AdamW, micro-batches of 4096 tokens, activation checkpointing) in a
fresh forked process; configurations interleaved, min/median/max of the repeats.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch
from common import Measurement, measure
from memory import build_model, minibatch, spread

from minpro_cli.distributed import SINGLE
from minpro_cli.logprobs import response_logprobs
from minpro_cli.lora import LoraAdapters
from minpro_cli.objectives.minpro import MinPRO
from minpro_cli.penalties import Penalties
from minpro_cli.sections import LoraConfig
from minpro_cli.step import Trainee, update_step

CONFIGS = ["full", "full+kl", "lora", "lora+kl"]


def step(config: str, args: argparse.Namespace) -> Callable[[], tuple[float, int]]:
    def run() -> tuple[float, int]:
        model = build_model(args.vocab, args.model)
        batch = minibatch(args.responses, model.config.vocab_size, args.response_tokens)
        reference: torch.nn.Module | None = None
        if config.startswith("lora"):
            plain_copy_for_sampling = copy.deepcopy(model)  # noqa: F841 (held, as minpro train holds it)
            adapters = LoraAdapters.attach(model, LoraConfig(r=args.rank))
        elif config.endswith("+kl"):
            reference = copy.deepcopy(model).requires_grad_(False)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()

        def reference_logprobs(packed, temperature):
            if reference is not None:
                return response_logprobs(reference, packed, temperature)[0]
            with adapters.disabled():
                return response_logprobs(model, packed, temperature)[0]

        penalties = Penalties(0.05, "k3", 0.0, reference_logprobs) if config.endswith("+kl") else Penalties()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        trainee = Trainee(model, 0, SINGLE, micro_batch_tokens=4096)
        started = time.perf_counter()
        update_step(trainee, optimizer, MinPRO(), batch, grad_clip=1.0, penalties=penalties)
        tokens = sum(len(p) + len(r) for p, r in zip(batch.prompts, batch.responses))
        return time.perf_counter() - started, tokens

    return run


def held_mb(config: str, args: argparse.Namespace) -> float:
    """Bytes of the tensors a run holds across steps: weights (and copies), gradients, AdamW moments."""
    model = build_model(args.vocab, args.model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if config.startswith("lora"):
        LoraAdapters.attach(model, LoraConfig(r=args.rank))
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    adapted = sum(p.numel() * p.element_size() for p in model.parameters())
    copies = weights if config.startswith("lora") or config.endswith("+kl") else 0  # sampling copy / reference
    return (adapted + copies + 3 * trained) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a local checkpoint instead of the random-init model")
    parser.add_argument("--vocab", type=int, default=49_152, help="vocabulary of the random-init model")
    parser.add_argument("--responses", type=int, default=8)
    parser.add_argument("--response-tokens", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[Measurement]] = {c: [] for c in CONFIGS}
    for repeat in range(args.repeats):
        for config in CONFIGS:
            m = measure(step(config, args))
            results[config].append(m)
            print(f"  repeat {repeat + 1}: {config:8s} {m.seconds:6.1f} s, {m.peak_mb:6.0f} MB", flush=True)
    model = args.model or f"random-init Llama, vocabulary {args.vocab}"
    print(f"\none optimizer step, {model}, {args.responses} responses of ~{args.response_tokens} tokens, "
          f"LoRA r={args.rank} on every linear layer; {torch.get_num_threads()} threads; "
          f"min/median/max of {args.repeats}")
    print(f"{'':8s} | {'held MB':>8} | {'peak MB':>17} | {'tokens/s':>17}")
    for config, ms in results.items():
        peak, speed = spread([m.peak_mb for m in ms], ".0f"), spread([m.tokens_per_s for m in ms], ".0f")
        print(f"{config:8s} | {held_mb(config, args):8.0f} | {peak:>17} | {speed:>17}")


if __name__ == "__main__":
    main()
