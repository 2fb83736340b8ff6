"""A question an endpoint refuses (400, 413, 422) is one it cannot take: graded wrong, kept, reported;
settings every endpoint would refuse are refused up front."""

from __future__ import annotations

import asyncio

import pytest

from tests.evals.fake_endpoint import fake_endpoint
from tests.evals.test_eval_run import EXAMPLES
from tests.evals.test_eval_run import run_eval as run_cli
from tokenmill.evals.endpoint_check import cannot_take
from tokenmill.evals.questions import Question
from tokenmill.evals.report import build_report, to_markdown
from tokenmill.evals.runner import EndpointUnusable, EvalSettings, run_eval
from tokenmill.protocol.errors import APIError

QUESTIONS = [
    Question("ok", "Two times seven?", "14", "numeric"),
    Question("long", "LONG " * 50, "14", "numeric"),
    Question("big", "BIG", "14", "numeric"),
    Question("odd", "ODD", "^", "regex"),  # an empty answer would match: a refusal must not
]
REFUSE = {"LONG": (400, "context_length_exceeded"), "BIG": (413, "too_large"), "ODD": (422, "unprocessable")}


def _questions_asked(fake) -> list[str]:
    return [r["messages"][-1]["content"] for r in fake.requests if r["max_tokens"] != 1]


def test_refused_questions_are_graded_wrong_reported_and_not_asked_again(tmp_path):
    path, settings = tmp_path / "answers.jsonl", EvalSettings()
    with fake_endpoint(refuse=REFUSE) as fake:
        records = asyncio.run(run_eval(QUESTIONS, {"f": fake.url}, settings, path))
        assert len(_questions_asked(fake)) == 4
        by_id = {r.id: r for r in records}
        assert by_id["ok"].correct is True
        for qid, status in (("long", "400 context_length_exceeded"), ("big", "413"), ("odd", "422")):
            r = by_id[qid]
            assert r.graded and r.correct is False and r.refused.startswith(status), r
            assert r.detail.startswith("cannot take it: ")
        report = build_report(QUESTIONS, records, ["f"])
        model = report.models[0]
        assert (model.correct, model.answered, model.not_answered, model.refused) == (1, 4, 0, 3)
        text = to_markdown(report)
        assert "| f | 1/4 | 25.0% |" in text and "| 0 | 3 |" in text and "cannot take a question" in text
        # Resumed: nothing is asked again while the question and the settings stay the same.
        again = asyncio.run(run_eval(QUESTIONS, {"f": fake.url}, settings, path))
        assert len(_questions_asked(fake)) == 4 and again == records
        # A question that changed is asked again.
        changed = [*QUESTIONS[:1], Question("long", "Short now?", "14", "numeric"), *QUESTIONS[2:]]
        final = asyncio.run(run_eval(changed, {"f": fake.url}, settings, path))
        assert _questions_asked(fake)[4:] == ["Short now?"] and final[1].correct is True


def test_only_a_refusal_of_the_request_itself_is_a_question_the_endpoint_cannot_take():
    for status in (400, 413, 422):
        assert cannot_take(APIError(status, "no", "invalid_request_error"))
    for status in (401, 403, 404, 408, 429, 500, 503):
        assert not cannot_take(APIError(status, "no", "x"))
    assert not cannot_take(TimeoutError())


def test_settings_an_endpoint_refuses_stop_the_run_before_any_question(tmp_path):
    with fake_endpoint(refuse={"Reply OK.": (400, "bad_temperature")}) as fake:
        with pytest.raises(
            EndpointUnusable, match=r"refused a 1-token request with the run's settings \(400\)"
        ):
            asyncio.run(run_eval(QUESTIONS, {"f": fake.url}, EvalSettings(temperature=3.0), tmp_path / "a"))
        assert fake.requests[0]["temperature"] == 3.0 and _questions_asked(fake) == []


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [("--max-tokens", "0", "--max-tokens 0 is invalid: allowed an integer >= 1"),
     ("--temperature", "-1", "--temperature -1 is invalid: allowed a number >= 0 (0: greedy)")],
)  # fmt: skip
def test_numeric_options_are_checked_before_any_call(option, value, says, tmp_path):
    result = run_cli(
        str(EXAMPLES), "--endpoint", "a=http://127.0.0.1:9", "--out", str(tmp_path), option, value
    )
    assert result.returncode == 2 and " ".join(result.stderr.split()) == f"error: {says}"


def test_eval_settings_name_the_field():
    for changes, field in (({"max_tokens": 0}, "max_tokens=0"), ({"temperature": -0.5}, "temperature=-0.5"),
                           ({"timeout_s": 0.0}, "timeout_s=0.0")):  # fmt: skip
        with pytest.raises(ValueError, match=field):
            EvalSettings(**changes)
