"""Problem sets, from the records `taskfiles` reads (the embedded tasks, local files and
folders, a hub dataset already in the local `datasets` cache).

Field names are configurable and may be dotted paths into nested fields
(`reward_model.ground_truth`); presets know the common public exports of the math benchmarks
and the TRL and verl dataset layouts. A prompt may be text or a list of chat messages
(`[{"role": "user", "content": ...}]`, TRL's conversational format and verl's), which the
sampler renders with the tokenizer's chat template. Nothing is downloaded.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from minpro_cli.errors import MinproError
from minpro_cli.taskfiles import EMBEDDED_PREFIX, task_records

PresetName = Literal["math500", "gsm8k", "aime", "amc", "minerva", "olympiadbench", "trl", "verl"]


class Problem(BaseModel):
    id: str
    question: str  # the text, or the last user message of a chat prompt
    answer: str
    messages: list[dict[str, str]] | None = None  # a chat prompt, rendered with the chat template
    columns: dict[str, Any] = Field(default_factory=dict)  # the whole record: reward functions see every column


@dataclass(frozen=True)
class Preset:
    """Candidate field names (first present wins) and how the answer is stored."""

    question: tuple[str, ...]
    answer: tuple[str, ...]
    id: tuple[str, ...] = ("id",)
    answer_form: Literal["plain", "after_hashes", "first_of_list"] = "plain"


PRESETS: dict[str, Preset] = {
    "math500": Preset(("problem",), ("answer",), ("unique_id", "id")),
    "gsm8k": Preset(("question",), ("answer",), answer_form="after_hashes"),
    "aime": Preset(("problem", "Problem", "question"), ("answer", "Answer"), ("id", "ID")),
    "amc": Preset(("problem", "question"), ("answer",), ("id",)),
    "minerva": Preset(("problem", "question"), ("answer",), ("id", "idx")),
    "olympiadbench": Preset(("question",), ("final_answer",), ("id",), answer_form="first_of_list"),
    # TRL's conversational prompt-only datasets; verl's RL parquet files
    "trl": Preset(("prompt",), ("solution", "answer", "ground_truth"), ("id",)),
    "verl": Preset(("prompt",), ("reward_model.ground_truth",), ("extra_info.index", "index", "id")),
}


def _encodable(text: str, where: str, field: str) -> None:
    """Text that cannot be written as UTF-8 (a lone surrogate such as JSON's "\\ud800") would fail
    only when the rollout file is written, after sampling."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise MinproError(
            f"{where}: the {field} holds {text[exc.start]!r} at character {exc.start}, which is not valid Unicode "
            "text (a lone surrogate); fix or drop the row"
        ) from None


def field_value(record: dict[str, Any], name: str) -> Any:
    """The value at a field name or a dotted path into nested fields (None if absent)."""
    value: Any = record
    for part in [name] if name in record else name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _pick(record: dict[str, Any], names: tuple[str, ...], where: str, what: str) -> tuple[str, Any]:
    for name in names:
        value = field_value(record, name)
        if value is not None:
            return name, value
    raise MinproError(
        f"{where}: no {what} field (looked for {', '.join(repr(n) for n in names)}; the row has "
        f"{', '.join(repr(k) for k in record)}); set data.{what}_field or data.preset"
    )


def _text(value: Any, where: str, field: str) -> str:
    """Text, or a number written as text; a list or a mapping is an error, never its repr."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise MinproError(
        f"{where}: field '{field}' holds a {type(value).__name__}, not text; point the data key at the field "
        "with the text (a dotted path reaches into nested fields, e.g. reward_model.ground_truth)"
    )


def _chat(value: Any) -> list[dict[str, str]] | None:
    """A chat prompt: a non-empty list of {role, content} messages with text content, or such a
    list written as text (a CSV cell: JSON, or the Python repr pandas writes)."""
    if isinstance(value, str) and value.lstrip().startswith("[{") and value.rstrip().endswith("}]"):
        value = _parsed_list(value)
    if not isinstance(value, list) or not value:
        return None
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
               for m in value):
        return None
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _parsed_list(text: str) -> Any:
    for parse in (json.loads, ast.literal_eval):  # literal_eval: Python literals only, never code
        try:
            return parse(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            continue
    return None


def _answer(value: Any, form: str, where: str) -> str:
    if form == "first_of_list":
        if isinstance(value, str) and value.startswith("["):
            value = json.loads(value)
        if isinstance(value, list):
            if not value:
                raise MinproError(f"{where}: empty answer list")
            value = value[0]
        return str(value).strip().strip("$").strip()
    text = _text(value, where, "answer")
    if form == "after_hashes":
        if "####" not in text:
            raise MinproError(f"{where}: a GSM8K answer should end in '#### <number>', got {text[-40:]!r}")
        return text.rsplit("####", 1)[1].strip().replace(",", "")
    return text.strip()


def load_problems(
    spec: str,
    question_field: str = "question",
    answer_field: str = "answer",
    id_field: str = "id",
    preset: str | None = None,
    split: str = "train",
    subset: str | None = None,
) -> list[Problem]:
    """Read problems; a missing id becomes `<name>-<n>`. With a preset, its field names are
    tried first, then the configured ones. `split` and `subset` select from a hub dataset."""
    chosen = PRESETS[preset] if preset else Preset((), (), ())
    questions = (*chosen.question, question_field)
    answers = (*chosen.answer, answer_field)
    ids = (*chosen.id, id_field)
    stem = Path(spec).stem if not spec.startswith(EMBEDDED_PREFIX) else spec[len(EMBEDDED_PREFIX) :]
    problems = []
    for n, (where, record) in enumerate(task_records(spec, split, subset)):
        found_id = next((v for k in ids if (v := field_value(record, k)) is not None), None)
        field, prompt = _pick(record, questions, where, "question")
        messages = _chat(prompt)
        user = [m["content"] for m in messages or [] if m["role"] == "user"]
        problem = Problem(
            id=_text(found_id, where, "id") if found_id is not None else f"{stem}-{n}",
            question=(user[-1] if user else messages[-1]["content"]) if messages else _text(prompt, where, field),
            answer=_answer(_pick(record, answers, where, "answer")[1], chosen.answer_form, where),
            messages=messages,
            columns=record,
        )
        for what, text in (("id", problem.id), (f"prompt ('{field}')", problem.question)):
            if not text.strip():
                raise MinproError(f"{where}: the {what} is empty; fill it in or drop the row")
        texts = [problem.id, problem.question, problem.answer, *(m["content"] for m in messages or [])]
        for field_name, text in zip(["id", "question", "answer", *["messages"] * len(texts)], texts):
            _encodable(text, where, field_name)
        problems.append(problem)
    if not problems:
        raise MinproError(f"task file {spec} holds no problems")
    duplicates = len(problems) - len({p.id for p in problems})
    if duplicates:
        raise MinproError(f"{spec}: {duplicates} problem id(s) repeat; ids must be unique (set data.id_field)")
    return problems


def render_prompt(template: str, problem: Problem) -> str:
    # replace, not str.format: templates may contain LaTeX braces such as \boxed{}
    return template.replace("{question}", problem.question)
