"""A team's question set: CSV, XLSX or JSONL rows of ``id, question, answer, grader, rubric, tags``.

``grader`` defaults to ``exact``; ``judge`` needs a ``rubric`` (what a correct
answer must contain); ``tags`` is a comma-separated list (CSV) or a list
(JSONL) for slicing the report. A numeric grader's tolerance can ride in the
grader cell as ``numeric:0.01``. Every problem names its line and column.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenmill.evals.graders import GRADERS, grade

ALL_GRADERS = (*GRADERS, "judge")


class QuestionError(ValueError):
    """A question file that cannot be used; the message names the line and the field."""


@dataclass(frozen=True, slots=True)
class Question:
    id: str
    question: str
    answer: str
    grader: str = "exact"
    tolerance: float = 1e-6  # numeric: relative
    rubric: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)


def load_questions(path: Path) -> list[Question]:
    if not path.is_file():
        raise QuestionError(f"questions file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [(c or "").strip().lower() for c in reader.fieldnames or ()]
            if header and "question" not in header:  # a file of ';'-separated columns reads as one column
                hint = "; the columns must be separated by ','" if any(";" in c for c in header) else ""
                raise QuestionError(
                    f"{path.name} line 1: the header names no 'question' column "
                    f"(allowed id, question, answer, grader, rubric, tags){hint}"
                )
            rows = [
                (n, {k.strip().lower(): v for k, v in row.items() if k})
                for n, row in enumerate(reader, start=2)
            ]
    elif suffix in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    item = json.loads(line)
                except ValueError as e:
                    raise QuestionError(f"{path.name} line {n}: not valid JSON ({e})") from None
                if not isinstance(item, dict):
                    raise QuestionError(f"{path.name} line {n}: each line must be a JSON object")
                rows.append((n, item))
    elif suffix == ".xlsx":
        rows = _xlsx_rows(path)
    else:
        allowed = ".csv, .xlsx and .jsonl"
        raise QuestionError(f"{path.name}: allowed formats are {allowed}, got {suffix or 'no suffix'}")
    questions = [_question(path.name, n, row) for n, row in rows]
    seen: set[str] = set()
    for q in questions:
        if q.id in seen:
            raise QuestionError(f"{path.name}: id {q.id!r} appears twice")
        seen.add(q.id)
    if not questions:
        raise QuestionError(f"{path.name} holds no questions")
    return questions


def _xlsx_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """The first sheet: a header row of column names, then one question per row (blank rows skipped)."""
    import openpyxl

    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as e:  # openpyxl raises several kinds for a file that is not a workbook
        raise QuestionError(f"{path.name}: not a readable .xlsx workbook ({e})") from None
    try:
        sheet = book.worksheets[0]
        rows = sheet.iter_rows(values_only=True)
        header = [str(c).strip().lower() if c is not None else "" for c in next(rows, ())]
        if "question" not in header:
            raise QuestionError(
                f"{path.name}: the first row must name the columns (id, question, answer, ...)"
            )
        out = []
        for n, values in enumerate(rows, start=2):
            if any(v is not None and str(v).strip() for v in values):
                out.append((n, {k: v for k, v in zip(header, values, strict=False) if k}))
        return out
    finally:
        book.close()


def _question(name: str, line: int, row: dict[str, Any]) -> Question:
    def cell(key: str, required: bool = False) -> str:
        value = row.get(key)
        text = "" if value is None else str(value).strip()
        if required and not text:
            raise QuestionError(f"{name} line {line}: column {key!r} is empty")
        return text

    grader, tolerance = cell("grader") or "exact", 1e-6
    if grader.startswith("numeric:"):
        grader, raw = grader.split(":", 1)
        try:
            tolerance = float(raw)
        except ValueError:
            raise QuestionError(f"{name} line {line}: grader tolerance {raw!r} is not a number") from None
    if grader not in ALL_GRADERS:
        allowed = ", ".join(ALL_GRADERS)
        raise QuestionError(f"{name} line {line}: grader={grader!r} is invalid: allowed {allowed}")
    if grader == "judge" and not cell("rubric"):
        raise QuestionError(f"{name} line {line}: grader 'judge' needs a rubric")
    tags = row.get("tags") or ()
    if isinstance(tags, str):
        tags = [t.strip() for t in tags.split(",") if t.strip()]
    answer = cell("answer", required=grader != "judge")
    if grader != "judge":
        try:  # a bad regex, a numeric answer with no number, a choice that is not one letter
            grade(grader, "", answer, tolerance)
        except ValueError as e:
            raise QuestionError(f"{name} line {line}: {e}") from None
    return Question(
        cell("id", True), cell("question", True), answer, grader, tolerance, cell("rubric"), tuple(tags)
    )
