"""Write assets/tasks/arith-gsm8k.jsonl: the first 200 held-out arithmetic problems in the GSM8K
export format (a worked `answer` ending in '#### <number>'), so the `gsm8k` preset and verifier
can be run offline. Deterministic: rerunning rewrites the same bytes.

    .venv/bin/python scripts/build_gsm8k_format_task.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

TASKS = Path(__file__).resolve().parents[1] / "src" / "minpro_cli" / "assets" / "tasks"


def worked_answer(expression: str, value: str) -> str:
    """'42+13-14' → '42+13 = 55\n55-14 = 41\n#### 41' (left to right, as the task defines)."""
    terms = re.findall(r"[+-]?\d+", expression)
    total, lines = int(terms[0]), []
    for term in terms[1:]:
        lines.append(f"{total}{term} = {total + int(term)}")
        total += int(term)
    assert str(total) == value, (expression, value)
    return "\n".join([*lines, f"#### {value}"])


def main() -> None:
    out = []
    with open(TASKS / "arith-test.jsonl", encoding="utf-8") as fh:
        for line in list(fh)[:200]:
            row = json.loads(line)
            expression = row["question"].removeprefix("Compute ").removesuffix(".")
            out.append({"question": f"What is {expression}?", "answer": worked_answer(expression, row["answer"])})
    (TASKS / "arith-gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out), encoding="utf-8")
    print(f"wrote {len(out)} problems to {TASKS / 'arith-gsm8k.jsonl'}")


if __name__ == "__main__":
    main()
