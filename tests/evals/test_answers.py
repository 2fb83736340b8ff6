"""The answers file: stored answers are graded again against the question file as it is now."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

from tokenmill.evals.answers import (
    AWAITING_JUDGE,
    AnswerRecord,
    append,
    judge_key,
    load_answers,
    regrade,
    rewrite,
)
from tokenmill.evals.questions import Question


def _record(answer: str = "Verona, in Italy", **changes) -> AnswerRecord:
    return replace(AnswerRecord("full", "q1", answer, False, "contains 'Padua'", 0.5, 10, 4), **changes)


def test_a_corrected_answer_or_grader_changes_the_verdict_without_asking_again():
    stored = _record()
    now = regrade(stored, Question("q1", "Where?", "Verona", "contains"))
    assert now.correct is True and now.detail == "contains 'Verona'"
    assert (now.answer, now.latency_s, now.completion_tokens) == (stored.answer, 0.5, 4)
    now = regrade(stored, Question("q1", "Where?", "^verona", "regex"))
    assert now.correct is True and now.detail == "matches /^verona/"
    now = regrade(stored, Question("q1", "Where?", "Verona", "exact"))
    assert now.correct is False


def test_a_judge_verdict_is_kept_only_while_the_judge_would_see_the_same():
    q = Question("q1", "Why is the sky blue?", "", "judge", rubric="mentions scattering")
    judged = _record("Rayleigh scattering", correct=True, detail="judge: PASS", judged=judge_key(q))
    assert regrade(judged, q) == judged
    for changed in (replace(q, rubric="mentions Rayleigh"), replace(q, answer="scattering")):
        again = regrade(judged, changed)
        assert again.correct is None and again.detail == AWAITING_JUDGE and again.judged is None
    # judged before this field existed: nothing says what the judge saw, so it is judged again
    assert regrade(replace(judged, judged=None), q).correct is None
    # a question that was a judge question and is now graded by rule
    assert regrade(judged, replace(q, grader="contains", answer="scattering")).correct is True


def test_failed_calls_are_asked_again_and_failed_judging_only_judged_again(tmp_path):
    path = tmp_path / "answers.jsonl"
    rows = [
        _record(),
        replace(_record("", id="q2"), correct=None, detail="", error="HTTP 500"),
        replace(_record("Rayleigh", id="q3"), correct=None, detail="", error="judge: HTTP 503"),
        replace(_record(id="q1"), correct=True),  # the later line wins
    ]
    path.write_text("".join(json.dumps(asdict(r)) + "\n" for r in rows) + '{"endpoint": "fu')
    done = load_answers(path)
    assert set(done) == {("full", "q1"), ("full", "q3")}
    assert done[("full", "q1")].correct is True
    q3 = Question("q3", "Why?", "", "judge", rubric="says why")
    assert regrade(done[("full", "q3")], q3).detail == AWAITING_JUDGE


def test_an_answer_appended_after_a_torn_line_is_read_back(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text(json.dumps(asdict(_record(id="q0"))) + '\n{"endpoint": "full", "id": "q1", "ans')
    append(path, _record())
    assert set(load_answers(path)) == {("full", "q0"), ("full", "q1")}
    append(path, _record(id="q2"))  # a file that ends well gets no blank line
    assert path.read_text().count("\n\n") == 0 and ("full", "q2") in load_answers(path)


def test_rewrite_keeps_what_a_run_can_use_graded_as_now(tmp_path):
    path = tmp_path / "answers.jsonl"
    failed = {"correct": None, "detail": "", "error": "HTTP 500"}
    rows = [
        _record(asked="old settings"),
        _record(asked="now"),  # the one q1 resumes from: replaces the line above
        replace(_record("", id="q2"), **failed),  # failed, no answer before it: kept, so it shows
        _record(id="q3"),
        replace(_record("", id="q3"), **failed),  # a failure after an answer: both kept
        _record(endpoint="other"),  # not in this run: kept as it is
    ]
    path.write_text("".join(json.dumps(asdict(r)) + "\n" for r in rows) + '{"endpoint": "fu')
    before = load_answers(path)
    regraded = replace(rows[1], correct=True, detail="contains 'Verona'")
    rewrite(path, {("full", "q1"): regraded, ("full", "q3"): rows[3]})
    lines = [AnswerRecord(**json.loads(line)) for line in path.read_text().splitlines()]
    assert lines == [regraded, rows[2], rows[3], rows[4], rows[5]]
    assert load_answers(path) == {**before, ("full", "q1"): regraded}
    assert not (tmp_path / "answers.jsonl.tmp").exists()
