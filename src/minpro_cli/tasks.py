"""Problem sets: the embedded arithmetic task or a local jsonl file."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from pydantic import BaseModel

from minpro_cli.errors import MinproError

EMBEDDED_PREFIX = "embedded:"


class Problem(BaseModel):
    id: str
    question: str
    answer: str


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
        raise MinproError(f"task file not found: {path} (give a .jsonl path or embedded:<name>)")
    return path


def load_problems(
    spec: str, question_field: str = "question", answer_field: str = "answer", id_field: str = "id"
) -> list[Problem]:
    """Read one problem per jsonl line; a missing id becomes `<file stem>-<line>`."""
    path = resolve_task_path(spec)
    problems = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MinproError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
            for field in (question_field, answer_field):
                if field not in row:
                    raise MinproError(
                        f"{path}:{line_no}: missing field '{field}' "
                        f"(set data.question_field / data.answer_field to this file's names)"
                    )
            problems.append(
                Problem(
                    id=str(row.get(id_field, f"{path.stem}-{line_no}")),
                    question=str(row[question_field]),
                    answer=str(row[answer_field]),
                )
            )
    if not problems:
        raise MinproError(f"task file {path} holds no problems")
    return problems


def render_prompt(template: str, problem: Problem) -> str:
    # replace, not str.format: templates may contain LaTeX braces such as \boxed{}
    return template.replace("{question}", problem.question)
