"""The one-shot GPU check (≤ 8 minutes on one H100 or H200 with no network): what minpro's GPU
path rests on, measured where a GPU is lent, numbers to $OUT/gpu_check.json.

1. the CUDA tests (`tests/test_training_step.py -k cuda`);
2. a Qwen2.5-1.5B-shaped model with random weights (hidden 1536, 28 layers, vocabulary 151,936,
   tied): the `hf` sampler with its own bf16 copy (128 prompts × 256 new tokens: tokens/s, peak
   memory) and one bf16-autocast training step with micro-batches (s/step, peak memory);
3. the weight sync to a sampler in another process, per round: the disk (hash + float32
   safetensors export + read back, as the `vllm` sampler did before) against the shared-memory
   segment (`minpro_cli.weightsync`, bf16), each ending with the copy into a GPU-resident set of
   buffers (what an engine's reload does), seconds and GB/s; on the 1.5B model and on an
   8B-shaped bf16 one (Qwen3-8B: hidden 4096, 36 layers), and a checksum of what arrived;
4. the bf16-vs-fp32 log-prob gap by position: the embedded model sampling with a bf16 copy,
   scored in float32 (the trainer's side of the sampler–trainer mismatch).

The GPU image has torch 2.11 and transformers 5.17; minpro needs transformers ≥ 5.24 and a few
packages the image lacks (its 2026-11 package list; versions as minpro's .venv has them). Bring
them as wheels (25 MiB, downloaded and measured here; the device tool carries ≤ 64 MiB):

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl transformers==5.25.0 huggingface_hub==2.4.0 httpx2==2.17.0 httpcore2==2.17.0 truststore \\
        hf_xet==1.8.0 click==8.5.1 kernels==0.19.1 tomlkit pydantic==2.14.4 pydantic_core==2.50.5 \\
        annotated_types typing_inspection typing_extensions==4.16.0 math_verify==0.8.0 \\
        latex2sympy2_extended==1.10.2 antlr4_python3_runtime==4.13.2

and run, with `carry: [".whl"]` and `timeout_s: 540` (one rerun fits the 15 minutes):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site:src && PYTHONUNBUFFERED=1 timeout 480 \\
        python3 scripts/gpu_check.py --out $OUT

`--device cpu --tiny` runs the same steps on small shapes here: a check of the script, not of a GPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))

from memory import minibatch
from weight_sync import disk, shm

from minpro_cli.modeling import Policy, load_policy
from minpro_cli.objectives.minpro import MinPRO
from minpro_cli.samplers import policy_logprobs
from minpro_cli.samplers.hf import HFSampler
from minpro_cli.step import Trainee, update_step
from minpro_cli.weightsync import WeightSegment

SHAPES = {  # name: (hidden, intermediate, layers, heads, kv heads, vocabulary)
    "1.5b": (1536, 8960, 28, 12, 2, 151_936),
    "8b": (4096, 12_288, 36, 32, 8, 151_936),
    "tiny": (128, 256, 2, 4, 2, 1_000),
}


def random_model(shape: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    config = Qwen2Config(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         tie_word_embeddings=True)  # fmt: skip
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def timed(device: str, run: Callable[[], object]) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    run()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def cuda_tests() -> dict:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_training_step.py",
                           "-k", "cuda"], check=False, cwd=ROOT, capture_output=True, text=True, timeout=240)  # fmt: skip
    return {"returncode": done.returncode, "summary": done.stdout.strip().splitlines()[-1:]}


def sampler_and_step(shape: str, device: str, prompts: int, new_tokens: int) -> dict:
    model = random_model(shape, device, torch.float32)
    policy = Policy(model, load_policy("embedded").tokenizer, Path(shape), torch.bfloat16)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (prompts, 32), generator=torch.Generator().manual_seed(0)).tolist()
    sampler = HFSampler(max_new_tokens=new_tokens, batch_size=prompts, dtype="bfloat16")
    sampler.generate(policy, ids[:2], seed=0)  # warm-up: the bf16 copy and kernels
    reset_peak(device)
    with policy.autocast():
        seconds = timed(device, lambda: sampler.generate(policy, ids, seed=1))
    out = {"sample_tokens_per_s": prompts * new_tokens / seconds, "sample_peak_gib": peak_gib(device)}
    batch = minibatch(64, vocab)
    trainee = Trainee(model, 0, compute_dtype=torch.bfloat16, micro_batch_tokens=16_384)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    update_step(trainee, optimizer, MinPRO(), minibatch(4, vocab), grad_clip=1.0)  # warm-up
    reset_peak(device)
    seconds = timed(device, lambda: update_step(trainee, optimizer, MinPRO(), batch, grad_clip=1.0))
    tokens = sum(len(p) + len(r) for p, r in zip(batch.prompts, batch.responses))
    return out | {"step_s": seconds, "step_tokens": tokens, "step_peak_gib": peak_gib(device)}


def sync(shape: str, device: str, dtype: torch.dtype, repeats: int) -> dict:
    """Per-round sync, disk against shared memory, into GPU-resident buffers (as an engine's);
    each path on its own, so a too-small /dev/shm (a finding) leaves the disk's numbers."""
    model = random_model(shape, device, dtype)
    buffers = {k: torch.empty_like(v, dtype=torch.bfloat16) for k, v in model.state_dict().items()}
    segment, scratch = WeightSegment(), Path(tempfile.mkdtemp(prefix="minpro-gpu-check-"))
    paths = {"shm": lambda: shm(model, buffers, segment, torch.bfloat16), "disk": lambda: disk(model, buffers, scratch)}
    out: dict = {"bytes_bf16": sum(t.numel() * 2 for t in buffers.values())}
    for name, run in paths.items():
        try:
            seconds = []
            for _ in range(repeats):
                with torch.no_grad():
                    for parameter in model.parameters():
                        parameter.mul_(1.0)  # written, as by a step: the disk path re-hashes
                seconds.append(timed(device, run))
            out |= {f"{name}_s_median": statistics.median(seconds), f"{name}_s_all": seconds}
            expected = model.state_dict()
            out[f"{name}_arrived_exactly"] = all(torch.equal(t.cpu(), expected[k].to(torch.bfloat16).cpu())
                                                 for k, t in buffers.items())  # fmt: skip
        except Exception as exc:  # noqa: BLE001 — reported with the others' numbers
            out[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
    segment.close()
    shutil.rmtree(scratch, ignore_errors=True)
    return out


def precision_gap(device: str) -> dict:
    """log μ of a bf16 sampling copy against the float32 trainer, by response position."""
    policy = load_policy("embedded", device=device)
    ids = [policy.tokenizer.encode(f"Question: What is {a} + {b}?\nAnswer:") for a in range(8) for b in range(8)]
    generations = HFSampler(max_new_tokens=64, dtype="bfloat16").generate(policy, ids, seed=0)
    trainer = policy_logprobs(policy, ids, generations)
    gaps: dict[int, list[float]] = {}
    for full, g in zip(trainer, generations):
        for t, gap in enumerate((full - torch.tensor(g.logprobs)).abs().tolist()):
            gaps.setdefault(t // 16, []).append(gap)
    return {f"positions_{16 * k}_{16 * k + 15}": {"max": max(v), "mean": statistics.fmean(v)} for k, v in gaps.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small shapes: a check of the script itself")
    args = parser.parse_args()
    report: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    big, huge = ("tiny", "tiny") if args.tiny else ("1.5b", "8b")
    steps = [("cuda_tests", cuda_tests),
             ("model_1_5b", lambda: sampler_and_step(big, args.device, 8 if args.tiny else 128, 16 if args.tiny else 256)),
             ("sync_1_5b", lambda: sync(big, args.device, torch.float32, 3)),
             ("sync_8b_bf16", lambda: sync(huge, args.device, torch.bfloat16, 2)),
             ("precision_gap", lambda: precision_gap(args.device))]  # fmt: skip
    for name, step in steps:
        started = time.perf_counter()
        try:
            report[name] = step()
        except Exception as exc:  # noqa: BLE001 — one failed step must not lose the others' numbers
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"{name} ({time.perf_counter() - started:.0f} s): {json.dumps(report[name])[:400]}", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
