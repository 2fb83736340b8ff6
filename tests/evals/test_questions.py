"""Question files: CSV and JSONL, every problem named by line and column."""

from __future__ import annotations

import json

import pytest

from tokenmill.evals.questions import QuestionError, load_questions


def test_csv_and_jsonl_load_the_same_questions(tmp_path):
    csv_file = tmp_path / "q.csv"
    csv_file.write_text(
        "id,question,answer,grader,rubric,tags\n"
        'a,"Two plus two?",4,numeric:0.01,,"math, easy"\n'
        "b,Capital of France?,Paris,contains,,\n"
        "c,Explain rain,,judge,mentions condensation,\n"
    )
    rows = [
        {
            "id": "a",
            "question": "Two plus two?",
            "answer": "4",
            "grader": "numeric:0.01",
            "tags": ["math", "easy"],
        },
        {"id": "b", "question": "Capital of France?", "answer": "Paris", "grader": "contains"},
        {"id": "c", "question": "Explain rain", "grader": "judge", "rubric": "mentions condensation"},
    ]
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    from_csv, from_jsonl = load_questions(csv_file), load_questions(jsonl)
    assert from_csv == from_jsonl
    assert from_csv[0].tolerance == 0.01 and from_csv[0].tags == ("math", "easy")
    assert from_csv[2].grader == "judge" and from_csv[2].answer == ""


@pytest.mark.parametrize(
    ("lines", "says"),
    [
        (
            ['{"id": "a", "question": "q", "answer": "x", "grader": "fuzzy"}'],
            "line 1: grader='fuzzy' is invalid",
        ),
        (['{"id": "a", "question": "q"}'], "line 1: column 'answer' is empty"),
        (['{"id": "a", "question": "q", "grader": "judge"}'], "line 1: grader 'judge' needs a rubric"),
        (['{"id": "a", "question": "q", "answer": "x"}'] * 2, "id 'a' appears twice"),
        (["{nope"], "line 1: not valid JSON"),
    ],
)
def test_bad_question_files_name_the_line_and_column(tmp_path, lines, says):
    f = tmp_path / "q.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(QuestionError, match=says):
        load_questions(f)


def test_unknown_format_names_the_allowed_ones(tmp_path):
    f = tmp_path / "q.ods"
    f.write_bytes(b"PK")
    with pytest.raises(QuestionError, match=r"allowed formats are \.csv, \.xlsx and \.jsonl"):
        load_questions(f)


def test_xlsx_loads_the_first_sheet_with_its_header(tmp_path):
    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(["id", "question", "answer", "grader", "rubric", "tags"])
    sheet.append(["a", "Two plus two?", 4, "numeric", None, "math"])
    sheet.append([None, None, None, None, None, None])  # a blank row is skipped
    sheet.append(["b", "Capital of France?", "Paris", "contains", None, None])
    path = tmp_path / "q.xlsx"
    book.save(path)
    questions = load_questions(path)
    assert [(q.id, q.answer, q.grader, q.tags) for q in questions] == [
        ("a", "4", "numeric", ("math",)),
        ("b", "Paris", "contains", ()),
    ]
    broken = tmp_path / "broken.xlsx"
    broken.write_bytes(b"not a zip")
    with pytest.raises(QuestionError, match=r"not a readable \.xlsx workbook"):
        load_questions(broken)


@pytest.mark.parametrize(
    ("answer", "grader", "says"),
    [("[", "regex", r"q\.jsonl line 2: answer='\[' is not a valid regex"),
     ("seven", "numeric", r"q\.jsonl line 2: answer='seven' has no number"),
     ("AB", "choice", r"q\.jsonl line 2: answer='AB' is invalid for grader 'choice'")],
)  # fmt: skip
def test_an_answer_its_grader_cannot_use_names_the_line(tmp_path, answer, grader, says):
    f = tmp_path / "q.jsonl"
    rows = [
        {"id": "a", "question": "q", "answer": "x"},
        {"id": "b", "question": "q", "answer": answer, "grader": grader},
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(QuestionError, match=says):
        load_questions(f)


def test_a_csv_whose_header_has_no_question_column_says_so(tmp_path):
    f = tmp_path / "q.csv"
    f.write_text("id;question;answer\n1;Hi;x\n")
    with pytest.raises(
        QuestionError, match=r"q\.csv line 1: the header names no 'question' column .*separated by ','"
    ):
        load_questions(f)
    f.write_text("ID,Question,Answer\n1,Hi,x\n")  # capitals, as in a spreadsheet's export
    assert [(q.id, q.question, q.answer) for q in load_questions(f)] == [("1", "Hi", "x")]
