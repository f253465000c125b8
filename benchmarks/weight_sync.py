"""Per-round weight sync to a sampler in another process: the disk against shared memory.

    .venv/bin/python benchmarks/weight_sync.py [--models smollm2,1b] [--repeats 5]

`disk` is what the `vllm` sampler did every round before (and does with `transport: disk`):
hash the whole model to see that it changed (`model_fingerprint`), export a float32
safetensors checkpoint, and the engine reads it back. `shm` is `minpro_cli.weightsync`: the
weights streamed one tensor at a time into a segment under /dev/shm, in the engine's dtype
(float32 on CPU, bfloat16 on a GPU), and read back as views. On both, the sampler's side ends
by copying every tensor into a model-sized set of buffers, as an engine's in-place reload does.
Each repeat first writes every weight in place (a training step would), so the hash is not
cached. Paths interleaved, min/median/max seconds over the repeats, and GB/s of the bytes moved.

Models: `embedded` (0.9M), `smollm2` (SmolLM2-135M, `bash scripts/setup_smollm2.sh`), `1b`
(a random Llama of 1.2B parameters: hidden 2048, 16 layers, vocabulary 128k, tied head, as
Llama-3.2-1B). Check `uptime` first: nothing else should run.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from memory import spread
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from minpro_cli.modeling import embedded_model_dir, model_fingerprint
from minpro_cli.weightsync import WeightSegment, named_weights, planned_bytes, read_weights

ROOT = Path(__file__).resolve().parents[1]


def load(name: str) -> torch.nn.Module:
    if name == "embedded":
        return AutoModelForCausalLM.from_pretrained(embedded_model_dir())
    if name == "smollm2":
        return AutoModelForCausalLM.from_pretrained(ROOT / "runs/smollm2/model")
    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128_256, tie_word_embeddings=True)  # fmt: skip
    return AutoModelForCausalLM.from_config(config)


def copy_into(buffers: dict[str, torch.Tensor], weights) -> None:
    """The engine's side of a reload: every tensor copied into its own parameter."""
    for name, tensor in weights:
        buffers[name].copy_(tensor)


def disk(model: torch.nn.Module, buffers: dict[str, torch.Tensor], directory: Path) -> None:
    model_fingerprint(model)
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    del state
    copy_into(buffers, load_file(str(directory / "model.safetensors")).items())


def shm(model: torch.nn.Module, buffers: dict[str, torch.Tensor], segment: WeightSegment, dtype: torch.dtype) -> None:
    segment.write(named_weights(model, dtype), 0, planned_bytes(model, dtype))
    _, weights = read_weights(segment.table)
    copy_into(buffers, weights)


def prepared(model: torch.nn.Module, path: str, dtype: torch.dtype, scratch: Path) -> tuple[Callable[[], None], Callable[[], None]]:
    """One sync of `path`, with what it runs into made beforehand (a sampler's buffers, touched
    once, and for shared memory a segment already reserved, as every round after a run's first
    finds them), and how to release them: only one path's memory is held at a time."""
    buffers = {k: torch.zeros_like(v, dtype=dtype) for k, v in model.state_dict().items()}
    if path == "disk":
        return (lambda: disk(model, buffers, scratch)), buffers.clear
    segment = WeightSegment()
    segment.write([], 0, planned_bytes(model, dtype))  # reserves the pages
    return (lambda: shm(model, buffers, segment, dtype)), lambda: (buffers.clear(), segment.close())


def bench(name: str, repeats: int) -> list[str]:
    model = load(name).eval()
    n_params = sum(p.numel() for p in model.parameters())
    paths = {"shm float32": ("shm", torch.float32), "shm bfloat16": ("shm", torch.bfloat16),
             "disk float32 (+ hash)": ("disk", torch.float32)}  # fmt: skip
    scratch = Path(tempfile.mkdtemp(prefix="minpro-bench-sync-"))
    times: dict[str, list[float]] = {label: [] for label in paths}
    for _ in range(repeats + 1):  # the first round warms the page cache and allocations: dropped
        for label, (path, dtype) in paths.items():
            run, release = prepared(model, path, dtype, scratch)
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.mul_(1.0)  # written in place, as by a training step: the hash is redone
            started = time.perf_counter()
            run()
            times[label].append(time.perf_counter() - started)
            release()
    shutil.rmtree(scratch)
    rows = []
    for label, (_, dtype) in paths.items():
        kept, nbytes = times[label][1:], planned_bytes(model, dtype)
        gbps = [nbytes / t / 1e9 for t in kept]
        rows.append(f"| {name} ({n_params / 1e6:.0f}M) | {label} | {nbytes / 2**30:.3f} | {spread(kept, '.2f')} | "
                    f"{spread(gbps, '.2f')} |")  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,1b")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch threads {torch.get_num_threads()}, {args.repeats} interleaved repeats (min/median/max)\n")
    print("| model | path | GiB moved | seconds per sync | GB/s |\n|---|---|---|---|---|")
    for name in args.models.split(","):
        for row in bench(name, args.repeats):
            print(row, flush=True)


if __name__ == "__main__":
    main()
