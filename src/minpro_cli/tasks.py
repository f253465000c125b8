"""Problem sets: the embedded arithmetic task or a local file (jsonl, json, parquet, csv).

Field names are configurable; a preset knows the common public exports of the math
benchmarks (field names and how their answers are stored). Nothing is downloaded.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from minpro_cli.errors import MinproError

EMBEDDED_PREFIX = "embedded:"
FORMATS = (".jsonl", ".json", ".parquet", ".csv")
PresetName = Literal["math500", "gsm8k", "aime", "amc", "minerva", "olympiadbench"]


class Problem(BaseModel):
    id: str
    question: str
    answer: str


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
}


def embedded_tasks_dir() -> Path:
    return Path(str(resources.files("minpro_cli") / "assets" / "tasks"))


def resolve_task_path(spec: str) -> Path:
    """`embedded:arith-train` names a file shipped in the package; anything else is a path."""
    if spec.startswith(EMBEDDED_PREFIX):
        name = spec[len(EMBEDDED_PREFIX) :]
        path = embedded_tasks_dir() / f"{name}.jsonl"
        if not path.is_file():
            known = sorted(p.stem for p in embedded_tasks_dir().glob("*.jsonl"))
            raise MinproError(f"unknown embedded task '{name}'; known: {', '.join(known)}")
        return path
    path = Path(spec)
    if not path.is_file():
        raise MinproError(f"task file not found: {path} (give a {'/'.join(FORMATS)} path or embedded:<name>)")
    if path.suffix not in FORMATS:
        raise MinproError(f"{path}: unknown task format '{path.suffix}'; use one of {', '.join(FORMATS)}")
    return path


def read_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) pairs; `where` is 'file:line' or 'file row N' for error messages."""
    try:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as fh:
                for line_no, line in enumerate(fh, start=1):
                    if line.strip():
                        yield f"{path}:{line_no}", _object(json.loads(line), f"{path}:{line_no}")
        elif path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            records = data.get("data", data.get("rows")) if isinstance(data, dict) else data
            if not isinstance(records, list):
                raise MinproError(f"{path}: expected a list of problems (or {{'data': [...]}})")
            for i, record in enumerate(records):
                yield f"{path} item {i}", _object(record, f"{path} item {i}")
        elif path.suffix == ".parquet":
            for i, record in enumerate(pq.read_table(path).to_pylist()):
                yield f"{path} row {i}", record
        else:
            with open(path, encoding="utf-8", newline="") as fh:
                for i, record in enumerate(csv.DictReader(fh), start=2):
                    yield f"{path}:{i}", record
    except json.JSONDecodeError as exc:
        raise MinproError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError as exc:
        raise MinproError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start}); re-save it as UTF-8") from None
    except (pa.ArrowException, OSError) as exc:
        raise MinproError(f"{path}: cannot read ({exc})") from None


def _object(record: Any, where: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise MinproError(f"{where}: expected an object with the problem's fields, got {type(record).__name__}")
    return record


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


def _pick(record: dict[str, Any], names: tuple[str, ...], where: str, what: str) -> Any:
    for name in names:
        if name in record and record[name] is not None:
            return record[name]
    raise MinproError(
        f"{where}: no {what} field (looked for {', '.join(repr(n) for n in names)}; the row has "
        f"{', '.join(repr(k) for k in record)}); set data.{what}_field or data.preset"
    )


def _answer(value: Any, form: str, where: str) -> str:
    if form == "first_of_list":
        if isinstance(value, str) and value.startswith("["):
            value = json.loads(value)
        if isinstance(value, list):
            if not value:
                raise MinproError(f"{where}: empty answer list")
            value = value[0]
        return str(value).strip().strip("$").strip()
    text = str(value)
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
) -> list[Problem]:
    """Read problems; a missing id becomes `<file stem>-<n>`. With a preset, its field names
    are tried first, then the configured ones."""
    path = resolve_task_path(spec)
    chosen = PRESETS[preset] if preset else Preset((), (), ())
    questions = (*chosen.question, question_field)
    answers = (*chosen.answer, answer_field)
    ids = (*chosen.id, id_field)
    problems = []
    for n, (where, record) in enumerate(read_records(path)):
        found_id = next((record[k] for k in ids if record.get(k) is not None), None)
        problem = Problem(
            id=str(found_id) if found_id is not None else f"{path.stem}-{n}",
            question=str(_pick(record, questions, where, "question")),
            answer=_answer(_pick(record, answers, where, "answer"), chosen.answer_form, where),
        )
        for field, text in problem.model_dump().items():
            _encodable(text, where, field)
        problems.append(problem)
    if not problems:
        raise MinproError(f"task file {path} holds no problems")
    duplicates = len(problems) - len({p.id for p in problems})
    if duplicates:
        raise MinproError(f"{path}: {duplicates} problem id(s) repeat; ids must be unique (set data.id_field)")
    return problems


def render_prompt(template: str, problem: Problem) -> str:
    # replace, not str.format: templates may contain LaTeX braces such as \boxed{}
    return template.replace("{question}", problem.question)
