"""Build the embedded default model and arithmetic task shipped in src/minpro_cli/assets/.

Deterministic and seeded: rerunning it on the same torch version and CPU count rewrites
the same task files byte for byte and the same weights.

    python scripts/build_default_assets.py            # ~4 minutes on 2 CPU cores

What it makes:
  * tasks/arith-train.jsonl, tasks/arith-test.jsonl: "Compute 23+4-7." → "20",
    disjoint splits;
  * default_model/: a ~1M-parameter Llama (char-level tokenizer) SFT-trained on worked
    solutions only far enough that temperature-1 sampling solves a minority of held-out
    problems, so RL has room to improve. Some of the SFT solutions end with a plain
    "so 20." instead of "\\boxed{20}", like a base model that only sometimes follows the
    answer format: RL has to learn the format as well as the arithmetic.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import string
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ASSETS = Path(__file__).resolve().parents[1] / "src" / "minpro_cli" / "assets"
SPECIALS = ["<pad>", "<eos>", "<unk>"]
PROMPT_TEMPLATE = "{question}\n"


def make_problem(rng: random.Random, n_ops: int) -> tuple[str, list[str], int]:
    """A chain of n_ops additions/subtractions and its worked steps."""
    value = rng.randint(1, 60)
    expr, steps = str(value), []
    for _ in range(n_ops):
        op, operand = rng.choice("+-"), rng.randint(1, 40)
        new = value + operand if op == "+" else value - operand
        steps.append(f"{value}{op}{operand}={new}")
        expr += f"{op}{operand}"
        value = new
    return f"Compute {expr}.", steps, value


def make_splits(seed: int, n_train: int, n_test: int, n_ops: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    rows = []
    while len(rows) < n_train + n_test:
        question, _, answer = make_problem(rng, n_ops)
        if question in seen:
            continue
        seen.add(question)
        rows.append({"question": question, "answer": str(answer)})
    test = [{"id": f"arith-test-{i:05d}", **r} for i, r in enumerate(rows[n_train:])]
    train = [{"id": f"arith-train-{i:05d}", **r} for i, r in enumerate(rows[:n_train])]
    return train, test


def solution_text(steps: list[str], answer: int, boxed: bool) -> str:
    body = ", ".join(steps)
    return f"{body}. \\boxed{{{answer}}}" if boxed else f"{body}, so {answer}."


def build_tokenizer() -> PreTrainedTokenizerFast:
    chars = sorted(set(string.printable) - set("\t\r\x0b\x0c"))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def sft_batches(tokenizer, seed: int, test_questions: set[str], n_ops: int, boxed_fraction: float):
    """Endless stream of (prompt + solution + eos) examples, loss on the solution only."""
    rng = random.Random(seed)
    while True:
        question, steps, answer = make_problem(rng, n_ops)
        if question in test_questions:
            continue
        prompt = tokenizer.encode(PROMPT_TEMPLATE.replace("{question}", question))
        target = tokenizer.encode(solution_text(steps, answer, rng.random() < boxed_fraction))
        yield prompt, target + [tokenizer.eos_token_id]


def collate(examples, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(p) + len(t) for p, t in examples)
    ids = torch.full((len(examples), length), pad_id)
    labels = torch.full((len(examples), length), -100)
    for i, (p, t) in enumerate(examples):
        seq = p + t
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(p) : len(seq)] = torch.tensor(t)
    return ids, labels


def sft(model, stream, pad_id: int, steps: int, peak_lr: float, batch_size: int, warmup: int) -> None:
    """AdamW, linear warm-up then cosine decay, loss on the solution tokens only."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.01)
    start = time.time()
    for step in range(steps):
        lr = peak_lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids, labels = collate([next(stream) for _ in range(batch_size)], pad_id)
        loss = model(input_ids=ids, attention_mask=(ids != pad_id).long(), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  lr {lr:.2e}  {time.time() - start:.0f}s", flush=True)


def sft_arguments(doc: str | None, steps: int, lr: float, batch_size: int) -> argparse.ArgumentParser:
    """The options both asset builders share (seed, SFT steps / lr / batch size, output)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--out", type=Path, default=ASSETS)
    return parser


def pin_determinism(seed: int) -> None:
    torch.manual_seed(seed)
    torch.set_num_threads(2)  # reductions depend on the thread count: pin it for bitwise reruns
    torch.use_deterministic_algorithms(True)


def main() -> None:
    parser = sft_arguments(__doc__, steps=1200, lr=3e-3, batch_size=64)
    parser.add_argument("--boxed-fraction", type=float, default=0.6)
    parser.add_argument("--n-ops", type=int, default=2)
    args = parser.parse_args()
    pin_determinism(args.seed)

    train, test = make_splits(args.seed, n_train=2000, n_test=500, n_ops=args.n_ops)
    tasks_dir = args.out / "tasks"
    tasks_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("arith-train", train), ("arith-test", test)):
        with open(tasks_dir / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    stream = sft_batches(tokenizer, args.seed + 1, {r["question"] for r in test}, args.n_ops, args.boxed_fraction)
    sft(model, stream, tokenizer.pad_token_id, args.steps, args.lr, args.batch_size, warmup=50)

    model.generation_config.do_sample = True  # sampling is what minpro does; keep HF's defaults honest
    model.generation_config.top_k = 0
    model.generation_config.top_p = 1.0
    model.save_pretrained(args.out / "default_model", safe_serialization=True)
    tokenizer.save_pretrained(args.out / "default_model")
    print(f"wrote {args.out / 'default_model'} and {tasks_dir}")


if __name__ == "__main__":
    main()
