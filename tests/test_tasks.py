"""Problem files: the four formats, the benchmark presets (small fixture files written here in
the shape of each public export), and errors that name the file and row."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from minpro_cli.errors import MinproError
from minpro_cli.tasks import load_problems

ROWS = [{"id": "p1", "question": "Compute 2+3.", "answer": "5"}, {"id": "p2", "question": "Compute 7-4.", "answer": "3"}]


def write(path: Path, records: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".json":
        path.write_text(json.dumps(records))
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_every_format_reads_the_same_problems(tmp_path, suffix):
    problems = load_problems(str(write(tmp_path / f"set{suffix}", ROWS)))
    assert [(p.id, p.question, p.answer) for p in problems] == [(r["id"], r["question"], r["answer"]) for r in ROWS]


PRESET_FIXTURES = {
    # MATH500 (HuggingFaceH4/MATH-500): problem, solution, answer, subject, level, unique_id
    "math500": ({"problem": "What is $1+1$?", "solution": "...", "answer": "\\frac{1}{2}", "subject": "Algebra",
                 "level": 1, "unique_id": "test/algebra/1.json"}, "test/algebra/1.json", "\\frac{1}{2}"),
    # GSM8K (openai/gsm8k): question, answer with the worked solution and '#### <number>'
    "gsm8k": ({"question": "Natalia sold clips...", "answer": "48/2 = <<48/2=24>>24\n#### 1,072"}, None, "1072"),
    # AIME 2024 (Maxwell-Jia/AIME_2024): ID, Problem, Solution, Answer (an int)
    "aime": ({"ID": "2024-I-1", "Problem": "Every morning Aya...", "Solution": "...", "Answer": 204}, "2024-I-1",
             "204"),
    # AMC23: id, problem, answer (a float in some exports)
    "amc": ({"id": 3, "problem": "What is ...?", "answer": 27.0}, "3", "27.0"),
    # Minerva math: question, answer
    "minerva": ({"question": "Preamble: ...", "answer": "0.3"}, None, "0.3"),
    # OlympiadBench: id, question, final_answer as a list of LaTeX strings
    "olympiadbench": ({"id": 2231, "question": "Find all ...", "final_answer": ["$\\frac{3}{2}$"]}, "2231",
                      "\\frac{3}{2}"),
}


@pytest.mark.parametrize("preset", sorted(PRESET_FIXTURES))
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_presets_read_public_exports(tmp_path, preset, suffix):
    record, expected_id, expected_answer = PRESET_FIXTURES[preset]
    path = write(tmp_path / f"{preset}{suffix}", [record])
    (problem,) = load_problems(str(path), preset=preset)
    assert problem.answer == expected_answer
    assert problem.id == (expected_id or f"{preset}-0")
    assert problem.question.startswith(next(v for k, v in record.items() if k in ("problem", "Problem", "question")))


def test_olympiadbench_answer_list_stored_as_a_string_in_csv(tmp_path):
    path = write(tmp_path / "ob.csv", [{"id": "1", "question": "q", "final_answer": '["$5$"]'}])
    assert load_problems(str(path), preset="olympiadbench")[0].answer == "5"


def test_missing_field_names_the_row_and_the_fields_present(tmp_path):
    path = write(tmp_path / "bad.jsonl", [ROWS[0], {"id": "p9", "prompt": "x", "answer": "1"}])
    with pytest.raises(MinproError, match=r"bad\.jsonl:2: no question field .*'prompt'.*data\.question_field"):
        load_problems(str(path))


def test_bad_gsm8k_answer_and_duplicate_ids_are_named(tmp_path):
    with pytest.raises(MinproError, match=r"g\.jsonl:1: a GSM8K answer should end in '#### <number>'"):
        load_problems(str(write(tmp_path / "g.jsonl", [{"question": "q", "answer": "12"}])), preset="gsm8k")
    with pytest.raises(MinproError, match="1 problem id"):
        load_problems(str(write(tmp_path / "d.jsonl", [ROWS[0], ROWS[0]])))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(MinproError, match="unknown task format '.txt'"):
        load_problems(str(tmp_path / "x.txt"))
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(MinproError, match=r"broken\.json: not valid JSON"):
        load_problems(str(tmp_path / "broken.json"))


def test_embedded_gsm8k_format_twin_matches_the_arithmetic_answers():
    twin = load_problems("embedded:arith-gsm8k", preset="gsm8k")
    original = load_problems("embedded:arith-test")[: len(twin)]
    assert len(twin) == 200
    assert [p.answer for p in twin] == [p.answer for p in original]
    assert all(o.question.removeprefix("Compute ").removesuffix(".") in t.question for t, o in zip(twin, original))
