"""Random-init Qwen2 models with a 1024-token byte-level BPE vocabulary, built deterministically.

Same seed, same corpus, same library versions → the same tokenizer and the same weights, so
both sides of a benchmark load one directory. The corpus is the arithmetic task's text plus
seeded pseudo-words (enough distinct pairs to fill 1024 tokens); nothing is downloaded.

    .venv/bin/python benchmarks/qwen2_models.py qwen2-4.5m runs/bench-models/qwen2-4.5m
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from minpro_cli.tasks import load_problems

VOCAB = 1024
EOS, PAD = "<|endoftext|>", "<|pad|>"
# (hidden, layers, heads, kv heads, intermediate): 4.46M and 33.7M parameters with tied embeddings
SHAPES = {
    "qwen2-4.5m": (256, 5, 4, 2, 836),
    "qwen2-34m": (512, 11, 8, 2, 1536),
}


def corpus(seed: int = 0) -> list[str]:
    """The task's questions and answers, then 20k seeded pseudo-words in sentences."""
    rng = random.Random(seed)
    syllables = [a + b for a in "bcdfghklmnprstvz" for b in "aeiou"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(2_000)]
    text = [f"{p.question}\n{p.answer}" for p in load_problems("embedded:arith-train")]
    text += [" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(20_000 // 12)]
    return text


def build_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=[EOS, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=PAD)


def build(name: str, directory: Path, seed: int = 0) -> Path:
    """Write model `name` (a key of SHAPES) to `directory` unless it is already there."""
    if (directory / "model.safetensors").is_file():
        return directory
    hidden, layers, heads, kv_heads, intermediate = SHAPES[name]
    tokenizer = build_tokenizer()
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=512,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def parameters(directory: Path) -> int:
    return sum(t.numel() for t in load_file(directory / "model.safetensors").values())


if __name__ == "__main__":
    out = build(sys.argv[1], Path(sys.argv[2]))
    print(f"{out}: {parameters(out) / 1e6:.2f}M parameters")
