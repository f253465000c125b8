"""Peak memory and tokens/s of one training step against responses per minibatch: the
pre-0.3 step (one forward/backward over the whole minibatch, full-vocabulary float32
log-softmax) and today's (micro-batches within a token budget, chunked log-probs, activation
checkpointing), side by side in one run.

    .venv/bin/python benchmarks/memory.py [--sizes 32 64 128 256] [--repeats 3] [--vocab 49152]

The model is a random-init Llama with SmolLM2's 49,152-token vocabulary (4 layers, 256 wide,
~20M parameters, most of them in the head); responses are ~256 tokens after ~32-token prompts.
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
from transformers import LlamaConfig, LlamaForCausalLM

import minpro_cli.train as train_module
from common import Measurement, measure
from minpro_cli.modeling import _full_vocabulary_logprobs
from minpro_cli.objectives.minpro import MinPRO
from minpro_cli.train import RolloutBatch, Trainee, update_step

PROMPT_TOKENS, RESPONSE_TOKENS = 32, 256


def build_model(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def minibatch(n: int, vocab: int) -> RolloutBatch:
    """n responses of 224–288 tokens after 24–40-token prompts, ratios near 1, mixed advantages."""
    gen = torch.Generator().manual_seed(n)
    prompts = [torch.randint(3, vocab, (PROMPT_TOKENS + int(d),), generator=gen).tolist()
               for d in torch.randint(-8, 9, (n,), generator=gen)]
    responses = [torch.randint(3, vocab, (RESPONSE_TOKENS + int(d),), generator=gen).tolist()
                 for d in torch.randint(-32, 33, (n,), generator=gen)]
    old = [[-float(torch.log(torch.tensor(float(vocab))))] * len(r) for r in responses]  # uniform μ
    return RolloutBatch(prompts, responses, old, torch.randn(n, generator=gen), temperature=1.0)


def step(n: int, vocab: int, path: str, budget: int) -> Callable[[], tuple[float, int]]:
    def run() -> tuple[float, int]:
        model = build_model(vocab)
        batch = minibatch(n, vocab)
        if path == "old":  # what update_step did before micro-batches and the chunked head
            train_module.response_logprobs = lambda m, b, t, with_entropy: _full_vocabulary_logprobs(m, b, t, with_entropy)
            trainee = Trainee(model, 0)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            trainee = Trainee(model, 0, micro_batch_tokens=budget)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        started = time.perf_counter()
        update_step(trainee, optimizer, MinPRO(), batch, grad_clip=1.0)
        tokens = sum(len(p) + len(r) for p, r in zip(batch.prompts, batch.responses))
        return time.perf_counter() - started, tokens

    return run


def spread(values: list[float], fmt: str) -> str:
    return "/".join(format(v, fmt) for v in (min(values), statistics.median(values), max(values)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=49_152)
    parser.add_argument("--budget", type=int, default=8192, help="micro_batch_tokens of the new path")
    parser.add_argument("--max-gb", type=float, default=18.0, help="skip old-path sizes estimated above this")
    args = parser.parse_args()
    results: dict[tuple[str, int], list[Measurement]] = {}
    for repeat in range(args.repeats):
        for n in args.sizes:
            for path in ("old", "new"):
                done = [m.peak_mb for (p, k), ms in results.items() if p == path for m in ms[:1] if k < n]
                sizes = [k for (p, k) in results if p == path and k < n]
                if path == "old" and len(sizes) >= 2:
                    (k0, k1), (m0, m1) = sizes[-2:], done[-2:]
                    if (m1 + (m1 - m0) / (k1 - k0) * (n - k1)) / 1024 > args.max_gb:
                        continue
                results.setdefault((path, n), []).append(measure(step(n, args.vocab, path, args.budget)))
                m = results[(path, n)][-1]
                print(f"  repeat {repeat + 1}: {path} {n:4d} responses: {m.seconds:7.1f} s, {m.peak_mb:7.0f} MB", flush=True)
    print(f"\none optimizer step, vocabulary {args.vocab}, ~{PROMPT_TOKENS}+{RESPONSE_TOKENS} tokens per response, "
          f"{torch.get_num_threads()} threads; min/median/max of {args.repeats}")
    print(f"{'responses':>9} | {'old: peak MB':>20} {'old: tokens/s':>17} | {'new: peak MB':>20} {'new: tokens/s':>17}")
    for n in args.sizes:
        cells = []
        for path in ("old", "new"):
            ms = results.get((path, n))
            if ms:
                cells += [spread([m.peak_mb for m in ms], ".0f"), spread([m.tokens_per_s for m in ms], ".0f")]
            else:
                cells += ["not run (est. > max-gb)", "–"]
        print(f"{n:9d} | {cells[0]:>20} {cells[1]:>17} | {cells[2]:>20} {cells[3]:>17}")


if __name__ == "__main__":
    main()
