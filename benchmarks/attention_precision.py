"""bf16 training's attention on this CPU: SDPA in bf16 against SDPA in float32 of the same inputs.

    .venv/bin/python benchmarks/attention_precision.py [--repeats 5] [--model runs/bench-models/qwen2-34m]

1. One micro-batch of the model under bf16 autocast (160 rows × 100 tokens, forward + backward),
   with transformers' `sdpa` against minpro's `minpro_sdpa`, each repeat in a fresh forked
   process (peak RSS is its own).
2. The kernel alone, forward + backward, at sequence lengths 64 to 512: ~16k tokens of a GQA
   layer of the 33.7M model's shape (8 query heads, 2 key/value heads, head dim 64), causal with
   left padding. `minpro_cli.attention` takes float32 below the crossover this table shows.

Configurations interleaved, min/median/max of the repeats. Check `uptime` first.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import measure
from memory import spread

import minpro_cli.attention  # noqa: F401 — registers `minpro_sdpa`

LENGTHS = (64, 100, 128, 192, 256, 384, 512)
TOKENS, HEADS, KV_HEADS, DIM = 16_000, 8, 2, 64


def kernel_seconds(length: int, float32: bool) -> float:
    rows = TOKENS // length
    q = torch.randn(rows, HEADS, length, DIM, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(rows, KV_HEADS, length, DIM, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    mask = torch.ones(length, length, dtype=torch.bool).tril().repeat(rows, 1, 1, 1)
    mask[:, :, :, :10] = False
    mask |= torch.eye(length, dtype=torch.bool)
    started = time.perf_counter()
    if float32:
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), mask, enable_gqa=True).bfloat16()
    else:
        out = F.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True)
    out.float().sum().backward()
    return time.perf_counter() - started


def model_step(model_dir: Path, implementation: str) -> tuple[float, int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.set_attn_implementation(implementation)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (160, 100), generator=gen)
    attention_mask = torch.ones_like(ids)
    attention_mask[:80, :20] = 0
    started = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids, attention_mask=attention_mask).logits
    logits.float().logsumexp(-1).mean().backward()
    return time.perf_counter() - started, ids.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", type=Path, default=Path("runs/bench-models/qwen2-34m"))
    args = parser.parse_args()
    if not (args.model / "config.json").exists():
        print(f"{args.model} not found (`python benchmarks/qwen2_models.py qwen2-34m {args.model}` builds it): model part skipped")
    else:
        model_table(args)
    kernel_table(args.repeats)


def model_table(args: argparse.Namespace) -> None:
    """Forked before this process runs any OpenMP work: a child forked after that can hang."""
    print(f"{args.model.name}, one micro-batch (160 × 100 tokens), bf16 autocast, forward + backward:\n")
    print("| attention | s (min/med/max) | peak RSS MB (median) |\n|---|---|---|")
    runs: dict[str, list] = {"sdpa": [], "minpro_sdpa": []}
    for _ in range(max(3, args.repeats // 2)):
        for name, measured in runs.items():
            measured.append(measure(lambda name=name: model_step(args.model, name)))
    for name, measured in runs.items():
        peak = statistics.median(m.peak_mb for m in measured)
        print(f"| {name} | {spread([m.seconds for m in measured], '.3f')} | {peak:.0f} |")


def kernel_table(repeats: int) -> None:
    print(f"\n{torch.get_num_threads()} threads\n\n| tokens per row | bf16 s (min/med/max) | float32 s | float32 / bf16 |")
    print("|---|---|---|---|")
    for length in LENGTHS:
        kernel_seconds(length, False), kernel_seconds(length, True)  # warm-up
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(repeats):
            for float32, seconds in times.items():
                seconds.append(kernel_seconds(length, float32))
        ratio = statistics.median(times[True]) / statistics.median(times[False])
        print(f"| {length} | {spread(times[False], '.3f')} | {spread(times[True], '.3f')} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
