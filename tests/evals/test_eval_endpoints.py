"""``tokenmill eval`` against endpoints that cannot answer: one line and exit 2 before any question;
a question's own failure is left out of the accuracy and asked again on the next run."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest

from tests.bench.test_cli import mock_server
from tests.evals.test_eval_run import EXAMPLES, run_eval
from tests.server.conftest import start_server
from tokenmill.client.http_transport import HTTPTransport
from tokenmill.evals.endpoint_check import endpoint_problem
from tokenmill.protocol.errors import APIError


@pytest.fixture(scope="module")
def keyed():
    """The demo model behind ``--api-key sekret``."""
    server = start_server("--api-key", "sekret")
    yield server
    server.stop()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(out: Path) -> list[dict]:
    path = out / "answers.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _one_line(text: str) -> str:
    return " ".join(text.split())


def test_an_unreachable_endpoint_stops_the_run_in_one_line(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}"
    result = run_eval(str(EXAMPLES), "--endpoint", f"full={url}", "--out", str(tmp_path), "--max-tokens", "4")
    assert result.returncode == 2, result.stderr
    assert f"--endpoint full={url} cannot be reached: connection refused" in result.stderr
    assert "ejected" not in result.stderr and "answered" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert _answers(tmp_path) == [] and not (tmp_path / "report.md").exists()


def test_a_refused_key_or_unknown_model_names_the_endpoint_and_the_cause(keyed, tmp_path):
    args = [str(EXAMPLES), "--endpoint", f"full={keyed.url}", "--out", str(tmp_path), "--max-tokens", "4"]
    result = run_eval(*args)
    assert result.returncode == 2 and _one_line(result.stderr) == (
        f"error: --endpoint full={keyed.url} refused the request (401): no API key was sent; "
        "pass --api-key or set $TOKENMILL_API_KEY"
    )
    result = run_eval(*args, "--api-key", "wrong")
    assert result.returncode == 2 and "(401): the API key sent is wrong" in result.stderr
    result = run_eval(*args, "--api-key", "sekret", "--model", "nope")
    assert result.returncode == 2
    expected = f"--endpoint full={keyed.url} does not serve --model 'nope' (404): it serves 'demo'"
    assert expected in result.stderr
    assert _answers(tmp_path) == []
    # One good endpoint beside a bad one: the bad one is named, nothing is asked.
    bad = f"http://127.0.0.1:{_closed_port()}"
    result = run_eval(*args, "--api-key", "sekret", "--endpoint", f"other={bad}")
    assert result.returncode == 2 and f"--endpoint other={bad} cannot be reached" in result.stderr
    assert _answers(tmp_path) == []
    # With the key and the model: answered, and a single model's report has no paired comparison.
    result = run_eval(*args, "--api-key", "sekret", "--model", "demo")
    assert result.returncode == 0, result.stderr
    report = (tmp_path / "report.md").read_text()
    assert "| full |" in report and "Paired comparison" not in report and "p-value" not in report


def test_failed_questions_are_not_graded_wrong_and_are_asked_again(tmp_path):
    args = [str(EXAMPLES), "--out", str(tmp_path), "--max-tokens", "4"]
    with mock_server("--ttft", "0", "--itl", "0", "--fail-every", "1") as url:  # every request: 500
        result = run_eval(*args, "--endpoint", f"m={url}")
    assert result.returncode == 1, result.stderr
    assert "5 questions not answered" in _one_line(result.stderr)
    assert "run again to retry them" in result.stderr
    report = (tmp_path / "report.md").read_text()
    assert "| m | 0/0 | - | - | 5 |" in report
    assert all(a["error"] and a["correct"] is None for a in _answers(tmp_path))
    with mock_server("--ttft", "0", "--itl", "0") as url:
        result = run_eval(*args, "--endpoint", f"m={url}")
    assert result.returncode == 0, result.stderr
    answered = [a for a in _answers(tmp_path) if a["error"] is None]
    assert sorted(a["id"] for a in answered) == [f"q{i}" for i in range(1, 6)]
    assert "| m | 0/5 |" in (tmp_path / "report.md").read_text()


def test_an_endpoint_lost_midway_stops_the_run_and_keeps_what_was_answered(tmp_path):
    args = [str(EXAMPLES), "--out", str(tmp_path), "--max-tokens", "4"]
    # The check takes one answer; the server then answers two questions and dies.
    with mock_server("--ttft", "0.05", "--itl", "0", "--crash-after", "3") as url:
        result = run_eval(*args, "--endpoint", f"m={url}")
    assert result.returncode == 2, result.stderr
    assert f"--endpoint m={url} cannot be reached" in result.stderr
    assert "the answers so far are kept" in result.stderr
    kept = [a for a in _answers(tmp_path) if a["error"] is None]
    assert 1 <= len(kept) <= 4
    with mock_server("--ttft", "0", "--itl", "0") as url:
        result = run_eval(*args, "--endpoint", f"m={url}")
    assert result.returncode == 0, result.stderr
    assert len([a for a in _answers(tmp_path) if a["error"] is None]) == 5


def test_a_failure_of_one_request_is_no_failure_of_the_endpoint():
    async def classify(error: BaseException):
        return await endpoint_problem("m", "http://127.0.0.1:9", error, "demo", None)

    for transient in (APIError(500, "boom", "api_error"), APIError(429, "busy", "rate_limit_error")):
        assert asyncio.run(classify(transient)) is None
    assert "(401)" in str(asyncio.run(classify(APIError.authentication())))

    async def refused():
        async with HTTPTransport(f"http://127.0.0.1:{_closed_port()}") as http:
            try:
                await http.request("GET", "/")
            except Exception as e:
                return await classify(e)

    assert "cannot be reached: connection refused" in str(asyncio.run(refused()))


def test_a_judge_lost_midway_keeps_the_answers_it_had_to_judge(keyed, tmp_path):
    questions, out = tmp_path / "q.jsonl", tmp_path / "out"
    row = {"id": "j", "question": "Why is the sky blue?", "grader": "judge", "rubric": "mentions light"}
    questions.write_text(json.dumps(row) + "\n")
    args = [str(questions), "--endpoint", f"full={keyed.url}", "--api-key", "sekret", "--judge", "judge"]
    args += ["--out", str(out), "--max-tokens", "4"]
    with mock_server("--ttft", "0", "--itl", "0", "--crash-after", "1") as url:  # answers the check only
        result = run_eval(*args, "--endpoint", f"judge={url}")
    assert result.returncode == 2 and f"--endpoint judge={url} cannot be reached" in result.stderr
    kept = [a for a in _answers(out) if a["endpoint"] == "full"]
    assert len(kept) == 1 and kept[0]["correct"] is None and kept[0]["detail"] == "awaiting the judge"
    with mock_server("--ttft", "0", "--itl", "0") as url:
        result = run_eval(*args, "--endpoint", f"judge={url}")
    assert result.returncode == 0, result.stderr
    final = [a for a in _answers(out) if a["endpoint"] == "full"][-1]
    assert final["latency_s"] == kept[0]["latency_s"] and isinstance(final["correct"], bool)
    assert final["judged"]
