"""An endpoint that takes requests and never answers: the run stops in one line, or records the
questions that time out; and a run that waits says how far it is."""

from __future__ import annotations

import json
import time

import pytest
import typer

from tests.evals.fake_endpoint import fake_endpoint
from tests.evals.test_eval_run import run_eval
from tokenmill.cli import eval as eval_cli


def _one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def questions(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(
        "".join(json.dumps({"id": f"q{i}", "question": f"Q {i}", "answer": "14"}) + "\n" for i in range(3))
    )
    return path


def test_an_endpoint_that_never_answers_stops_the_run_within_the_timeout(questions, tmp_path):
    with fake_endpoint(hang=True) as fake:
        started = time.monotonic()
        result = run_eval(
            str(questions), "--endpoint", f"f={fake.url}", "--out", str(tmp_path / "o"), "--timeout", "1"
        )
        took = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert _one_line(result.stderr) == (
        f"error: --endpoint f={fake.url} gave no answer to a 1-token request within --timeout 1 s"
    )
    assert took < 15


def test_questions_that_time_out_are_recorded_while_the_endpoint_still_answers(questions, tmp_path):
    out = tmp_path / "o"
    with fake_endpoint(hang_questions=True) as fake:
        result = run_eval(str(questions), "--endpoint", f"f={fake.url}", "--out", str(out), "--timeout", "1")
    assert result.returncode == 1, result.stderr
    assert "asked f 3/3 (3 not answered)" in _one_line(result.stderr)
    records = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [r["error"] for r in records] == ["no answer within --timeout 1 s"] * 3


def test_a_waiting_run_prints_how_far_each_endpoint_is(questions, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(eval_cli, "PROGRESS_EVERY_S", 0.3)
    with fake_endpoint(delay_s=1.0) as fake:
        eval_cli.eval_command(questions, [f"f={fake.url}"], out=tmp_path / "o", max_tokens=4)
    err = _one_line(capsys.readouterr().err)
    assert "checking the endpoints" in err or "asked f 0/3" in err
    assert "asked f 3/3" in err
    with fake_endpoint() as fake:
        eval_cli.eval_command(questions, [f"f={fake.url}"], out=tmp_path / "o", max_tokens=4)
    assert "nothing to ask: 3 answers of earlier runs reused" in _one_line(capsys.readouterr().err)


def test_a_timeout_that_is_not_a_positive_number_is_refused(questions, tmp_path):
    for bad in ("0", "-1", "nan"):
        result = run_eval(str(questions), "--endpoint", "f=http://127.0.0.1:9", "--timeout", bad)
        assert (
            result.returncode == 2
            and "--timeout" in result.stderr
            and "allowed a number of seconds above 0" in (_one_line(result.stderr))
        )
    with pytest.raises(typer.Exit):
        eval_cli.eval_command(questions, ["f=http://127.0.0.1:9"], out=tmp_path / "o", timeout=0)
