"""Peak memory and tokens/s of one training step against responses per minibatch: the
pre-0.3 step (one forward/backward over the whole minibatch, full-vocabulary float32
log-softmax) and today's (micro-batches within a token budget, chunked log-probs, activation
checkpointing), side by side in one run.

    .venv/bin/python benchmarks/memory.py [--sizes 32 64 128 256] [--repeats 3] [--vocab 49152]
    .venv/bin/python benchmarks/memory.py --model runs/smollm2/model --sizes 64 --paths new

The model is a random-init Llama with SmolLM2's 49,152-token vocabulary (4 layers, 256 wide,
~20M parameters, most of them in the head), or a local checkpoint (`--model`); responses are
~256 tokens after ~32-token prompts.
Each measurement is one optimizer step (MinPRO, AdamW) in a fresh forked process, so its peak
resident memory is that step's own (GPU: peak allocated). Configurations are interleaved and
repeated; min / median / max over the repeats are printed. The old path is not run where its
linear extrapolation from the smaller sizes passes `--max-gb` (it would be killed): "est.".
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from common import Measurement, measure
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

import minpro_cli.train as train_module
from minpro_cli.logprobs import _full_vocabulary_logprobs
from minpro_cli.modeling import load_policy
from minpro_cli.objectives.minpro import MinPRO
from minpro_cli.step import RolloutBatch, Trainee, update_step

PROMPT_TOKENS, RESPONSE_TOKENS = 32, 256


def build_model(vocab: int, path: str | None) -> PreTrainedModel:
    if path:
        return load_policy(path).model
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def minibatch(n: int, vocab: int, response_tokens: int = RESPONSE_TOKENS) -> RolloutBatch:
    """n responses of 224–288 tokens (response_tokens ± 32) after 24–40-token prompts, ratios
    near 1, mixed advantages."""
    gen = torch.Generator().manual_seed(n)
    prompts = [torch.randint(3, vocab, (PROMPT_TOKENS + int(d),), generator=gen).tolist()
               for d in torch.randint(-8, 9, (n,), generator=gen)]
    responses = [torch.randint(3, vocab, (response_tokens + int(d),), generator=gen).tolist()
                 for d in torch.randint(-32, 33, (n,), generator=gen)]
    old = [[-float(torch.log(torch.tensor(float(vocab))))] * len(r) for r in responses]  # uniform μ
    return RolloutBatch(prompts, responses, old, torch.randn(n, generator=gen), temperature=1.0)


def step(n: int, vocab: int, path: str, budget: int, model_path: str | None) -> Callable[[], tuple[float, int]]:
    def run() -> tuple[float, int]:
        model = build_model(vocab, model_path)
        batch = minibatch(n, model.config.vocab_size)
        if path == "old":  # what update_step did before micro-batches and the chunked head
            train_module.response_logprobs = lambda m, b, t, with_entropy: _full_vocabulary_logprobs(m, b, t, with_entropy)
            trainee = Trainee(model, 0)
        else:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            trainee = Trainee(model, 0, micro_batch_tokens=budget)
        model.train()  # as update_policy does: checkpointing only acts in training mode
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        started = time.perf_counter()
        update_step(trainee, optimizer, MinPRO(), batch, grad_clip=1.0)
        tokens = sum(len(p) + len(r) for p, r in zip(batch.prompts, batch.responses))
        return time.perf_counter() - started, tokens

    return run


def spread(values: list[float], fmt: str) -> str:
    return "/".join(format(v, fmt) for v in (min(values), statistics.median(values), max(values)))


def extrapolated_gb(measured: dict[int, list[Measurement]], n: int) -> float:
    """Peak memory at n responses, linear in n through the two largest measured sizes."""
    (k0, m0), (k1, m1) = [(k, ms[0].peak_mb) for k, ms in sorted(measured.items())[-2:]]
    return (m1 + (m1 - m0) / (k1 - k0) * (n - k1)) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=49_152)
    parser.add_argument("--model", help="a local checkpoint instead of the random-init model")
    parser.add_argument("--paths", nargs="+", choices=["old", "new"], default=["old", "new"])
    parser.add_argument("--budget", type=int, default=8192, help="micro_batch_tokens of the new path")
    parser.add_argument("--max-gb", type=float, default=18.0, help="skip old-path sizes estimated above this")
    args = parser.parse_args()
    results: dict[str, dict[int, list[Measurement]]] = {path: {} for path in args.paths}
    for repeat in range(args.repeats):
        for n in args.sizes:
            for path in args.paths:
                measured = results[path]
                if path == "old" and len(measured) >= 2 and n not in measured and extrapolated_gb(measured, n) > args.max_gb:
                    continue
                if path == "old" and repeat and n not in measured:
                    continue
                m = measure(step(n, args.vocab, path, args.budget, args.model))
                measured.setdefault(n, []).append(m)
                print(f"  repeat {repeat + 1}: {path} {n:4d} responses: {m.seconds:7.1f} s, {m.peak_mb:7.0f} MB", flush=True)
    model = args.model or f"random-init Llama, vocabulary {args.vocab}"
    print(f"\none optimizer step, {model}, ~{PROMPT_TOKENS}+{RESPONSE_TOKENS} tokens per response, "
          f"new path: micro_batch_tokens {args.budget} + chunked head + activation checkpointing; "
          f"{torch.get_num_threads()} threads; min/median/max of {args.repeats}")
    header = "".join(f" | {path + ': peak MB':>20} {path + ': tokens/s':>17}" for path in args.paths)
    print(f"{'responses':>9}{header}")
    for n in args.sizes:
        cells = ""
        for path in args.paths:
            ms = results[path].get(n)
            if ms:
                cells += f" | {spread([m.peak_mb for m in ms], '.0f'):>20} {spread([m.tokens_per_s for m in ms], '.0f'):>17}"
            else:
                cells += f" | {f'not run: est. {extrapolated_gb(results[path], n):.0f} GB':>20} {'–':>17}"
        print(f"{n:9d}{cells}")


if __name__ == "__main__":
    main()
