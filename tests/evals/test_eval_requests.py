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
