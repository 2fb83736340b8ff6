"""What eval sends and how it times it, against a stand-in endpoint (``fake_endpoint``)."""

from __future__ import annotations

import asyncio

from tests.evals.fake_endpoint import fake_endpoint
from tokenmill.evals.questions import Question
from tokenmill.evals.runner import EvalSettings, run_eval


def _questions(n: int, answer: str = "14") -> list[Question]:
    return [Question(f"q{i}", f"Question {i}?", answer, "numeric") for i in range(n)]


def test_a_template_with_other_braces_replaces_only_the_question(tmp_path):
    template = 'Reply as JSON like {"answer": "..."}; keep {x} as it is. Q: {question}'
    with fake_endpoint() as fake:
        settings = EvalSettings(system=None, template=template)
        records = asyncio.run(run_eval(_questions(1), {"f": fake.url}, settings, tmp_path / "a.jsonl"))
    assert records[0].graded
    sent = [r["messages"][0]["content"] for r in fake.requests if r["max_tokens"] != 1]
    assert sent == ['Reply as JSON like {"answer": "..."}; keep {x} as it is. Q: Question 0?']


def test_latency_is_the_endpoints_from_sending_not_the_wait_in_the_clients_queue(tmp_path):
    # The client lets 4 requests into flight at first: with 24 questions at once most wait their
    # turn, and a clock started before the queue read 1.0, 1.5, 2.0 s for an endpoint taking 0.5 s.
    with fake_endpoint(delay_s=0.5) as fake:
        records = asyncio.run(run_eval(_questions(24), {"f": fake.url}, EvalSettings(), tmp_path / "a.jsonl"))
    latencies = sorted(r.latency_s for r in records)
    assert all(r.graded for r in records)
    assert latencies[0] >= 0.5 and latencies[-1] < 0.9, latencies


def test_a_reply_with_no_choices_is_not_answered_rather_than_graded_empty(tmp_path):
    with fake_endpoint(no_choices=True) as fake:
        questions = [Question("q", "Anything?", "^", "regex")]  # an empty answer would match
        records = asyncio.run(run_eval(questions, {"f": fake.url}, EvalSettings(), tmp_path / "a.jsonl"))
    assert not records[0].graded and records[0].correct is None
    assert records[0].error == "the reply has no choices"


def test_a_rerun_grades_again_without_growing_the_answers_file(tmp_path):
    path = tmp_path / "answers.jsonl"
    with fake_endpoint() as fake:
        asyncio.run(run_eval(_questions(3, answer="15"), {"f": fake.url}, EvalSettings(), path))
        assert len(path.read_text().splitlines()) == 3
        for _ in range(2):  # the expected answer corrected, then the same again
            records = asyncio.run(run_eval(_questions(3), {"f": fake.url}, EvalSettings(), path))
            assert all(r.correct for r in records) and len(path.read_text().splitlines()) == 3
        assert len([r for r in fake.requests if r["max_tokens"] != 1]) == 3  # graded again, not asked
    assert all('"correct": true' in line for line in path.read_text().splitlines())
