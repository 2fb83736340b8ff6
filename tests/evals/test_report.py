"""The eval report: unanswered questions are left out of accuracy and pairs; one model has no pairs."""

from __future__ import annotations

from tokenmill.evals.answers import AnswerRecord
from tokenmill.evals.questions import Question
from tokenmill.evals.report import build_report, to_markdown

QUESTIONS = [Question(f"q{i}", f"Question {i}?", "yes") for i in range(1, 5)]


def _row(endpoint: str, qid: str, correct: bool | None) -> AnswerRecord:
    if correct is None:
        return AnswerRecord(endpoint, qid, "", None, "", 30.0, 0, 0, "HTTP 503: draining")
    return AnswerRecord(endpoint, qid, "yes" if correct else "no", correct, "", 0.5, 3, 1)


def test_questions_not_answered_are_left_out_not_graded_wrong():
    records = [
        *(_row("a", q.id, True) for q in QUESTIONS),
        _row("b", "q1", True), _row("b", "q2", None), _row("b", "q3", None), _row("b", "q4", False),
    ]  # fmt: skip
    report = build_report(QUESTIONS, records, ["a", "b"])
    a, b = report.models
    assert (a.correct, a.answered, a.not_answered, a.accuracy) == (4, 4, 0, 1.0)
    assert (b.correct, b.answered, b.not_answered, b.accuracy) == (1, 2, 2, 0.5)
    assert b.latency_p50_s == 0.5  # failed calls' waits are no latency of the model
    # paired on q1 and q4 only: q2 and q3 are neither "only a right" nor a disagreement
    _, _, pair = report.pairs[0]
    assert (pair.only_a, pair.only_b, pair.both, pair.neither) == (1, 0, 1, 0)
    assert [q.id for q, _ in report.disagreements] == ["q4"]
    text = to_markdown(report)
    assert "| not answered |" in text and "| b | 1/2 | 50.0% |" in text
    assert "left out of the accuracy" in text


def test_a_model_with_no_answer_has_no_accuracy():
    report = build_report(QUESTIONS, [_row("a", q.id, None) for q in QUESTIONS], ["a"])
    assert report.models[0].accuracy is None
    assert "| a | 0/0 | - | - | 4 |" in to_markdown(report)


def test_one_model_has_no_paired_comparison():
    report = build_report(QUESTIONS, [_row("a", q.id, True) for q in QUESTIONS], ["a"])
    text = to_markdown(report)
    assert report.pairs == [] and "Paired comparison" not in text and "p-value" not in text
    two = build_report(QUESTIONS, [_row(n, q.id, True) for n in ("a", "b") for q in QUESTIONS], ["a", "b"])
    assert "Paired comparison" in to_markdown(two)


def test_a_pipe_in_a_cell_reads_as_written_in_markdown_and_html():
    from tokenmill.evals.report import to_html

    questions = [Question("q|1", "Which: A or B?", "A|B", "regex")]
    records = [
        AnswerRecord("a", "q|1", "A", True, "", 0.5, 3, 1),
        AnswerRecord("b", "q|1", "C|D", False, "", 0.5, 3, 1),
    ]
    report = build_report(questions, records, ["a", "b"])
    text = to_markdown(report)
    row = next(line for line in text.splitlines() if line.startswith("| q"))
    assert row == "| q\\|1 | Which: A or B? | A\\|B | right: A | wrong: C\\|D |"  # (was "A/B")
    page = to_html(report, "eval")
    assert "<td>q|1</td><td>Which: A or B?</td><td>A|B</td><td>right: A</td><td>wrong: C|D</td>" in page
