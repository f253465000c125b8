"""Build the long-chain arithmetic task and the embedded model that can (sometimes) solve it.

The off-policy study needs long responses: the prefix ratio ρ_1:t has more tokens to drift
over. Each problem is a chain of 11–13 single-digit additions/subtractions, solved by
rewriting the chain one operation at a time (a scratchpad a 1M-parameter model can follow:
each line copies the previous one's tail), so every response is ≥ 150 tokens (the tokenizer
is character-level):

    Compute 23+4-7+2-5+9-3+8-6+1.
    =27-7+2-5+9-3+8-6+1
    =20+2-5+9-3+8-6+1
    ...
    =22
    \\boxed{22}

What it makes (deterministic and seeded, like build_default_assets.py):
  * tasks/arith-chain-train.jsonl, tasks/arith-chain-test.jsonl: disjoint splits;
  * chain_model/: the embedded default model fine-tuned on worked chains, only far enough
    that temperature-1 sampling solves a minority of held-out chains (one slip anywhere in
    ~12 steps loses the reward), so RL has room to improve.

    .venv/bin/python scripts/build_chain_assets.py      # ~9 minutes on 2 CPU cores
"""

from __future__ import annotations

import json
import random

import torch
from build_default_assets import PROMPT_TEMPLATE, pin_determinism, sft, sft_arguments
from transformers import AutoTokenizer, LlamaForCausalLM

MIN_OPS, MAX_OPS = 11, 13


def make_chain(rng: random.Random) -> tuple[str, str, int]:
    """A chain whose running value stays in [0, 99] (no minus signs to copy) and its rewrites."""
    value = rng.randint(10, 60)
    terms = []
    for _ in range(rng.randint(MIN_OPS, MAX_OPS)):
        operand = rng.randint(1, 9)
        op = rng.choice("+-") if operand <= value and value + operand <= 99 else ("-" if value + operand > 99 else "+")
        terms.append(f"{op}{operand}")
        value = value + operand if op == "+" else value - operand
    start = value - sum(int(t) for t in terms)
    lines, running = [], start
    for i, term in enumerate(terms):
        running += int(term)
        lines.append(f"={running}{''.join(terms[i + 1:])}")
    solution = "\n".join([*lines, f"\\boxed{{{value}}}"])
    return f"Compute {start}{''.join(terms)}.", solution, value


def make_splits(seed: int, n_train: int, n_test: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    rows = []
    while len(rows) < n_train + n_test:
        question, _, answer = make_chain(rng)
        if question not in seen:
            seen.add(question)
            rows.append({"question": question, "answer": str(answer)})
    train = [{"id": f"arith-chain-train-{i:05d}", **r} for i, r in enumerate(rows[:n_train])]
    test = [{"id": f"arith-chain-test-{i:05d}", **r} for i, r in enumerate(rows[n_train:])]
    return train, test


def sft_examples(tokenizer, seed: int, test_questions: set[str]):
    rng = random.Random(seed)
    while True:
        question, solution, _ = make_chain(rng)
        if question not in test_questions:
            prompt = tokenizer.encode(PROMPT_TEMPLATE.replace("{question}", question))
            yield prompt, tokenizer.encode(solution) + [tokenizer.eos_token_id]


@torch.no_grad()
def sampled_accuracy(model, tokenizer, problems: list[dict]) -> tuple[float, float]:
    """Temperature-1 accuracy and mean response length (tokens) on `problems`."""
    prompts = [tokenizer.encode(PROMPT_TEMPLATE.replace("{question}", p["question"])) for p in problems]
    width = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    out = model.generate(
        input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long(), max_new_tokens=320,
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=tokenizer.pad_token_id,
    )[:, width:]
    correct, lengths = 0, []
    for row, problem in zip(out.tolist(), problems):
        row = row[: row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row
        lengths.append(len(row))
        correct += tokenizer.decode(row).strip().endswith(f"\\boxed{{{problem['answer']}}}<eos>")
    return correct / len(problems), sum(lengths) / len(lengths)


def main() -> None:
    args = sft_arguments(__doc__, steps=800, lr=2e-3, batch_size=32).parse_args()
    pin_determinism(args.seed)

    train, test = make_splits(args.seed, n_train=2000, n_test=500)
    for name, rows in (("arith-chain-train", train), ("arith-chain-test", test)):
        with open(args.out / "tasks" / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)

    tokenizer = AutoTokenizer.from_pretrained(args.out / "default_model", local_files_only=True)
    model = LlamaForCausalLM.from_pretrained(args.out / "default_model", use_safetensors=True)
    stream = sft_examples(tokenizer, args.seed + 1, {r["question"] for r in test})
    sft(model, stream, tokenizer.pad_token_id, args.steps, args.lr, args.batch_size, warmup=30)

    model.eval()
    accuracy, length = sampled_accuracy(model, tokenizer, train[:200])
    print(f"temperature-1 accuracy on 200 training chains: {accuracy:.3f}, mean response {length:.0f} tokens")
    model.save_pretrained(args.out / "chain_model", safe_serialization=True)
    tokenizer.save_pretrained(args.out / "chain_model")
    print(f"wrote {args.out / 'chain_model'} and the arith-chain task files")


if __name__ == "__main__":
    main()
