"""``tokenmill batch`` against simulated workers: every custom_id exactly once across an interruption,
bad lines in the error file, a refused key or a dead server stops the job without losing work; with
a stand-in client, every way a line can fail ends in the error file."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest

from tests.server.conftest import start_server
from tokenmill.client import AsyncClient
from tokenmill.client.batch import BatchJob
from tokenmill.client.dispatch import Reply
from tokenmill.client.rate_limit import QuotaExceeded


def write_input(path, n: int, extra: list[str] = ()) -> None:
    lines = []
    for i in range(n):
        if i % 2:
            body = {
                "messages": [{"role": "user", "content": f"question {i}"}],
                "max_tokens": 24,
                "ignore_eos": True,
            }
            lines.append(
                json.dumps(
                    {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
                )
            )
        else:
            body = {"prompt": f"question {i}", "max_tokens": 24, "ignore_eos": True}
            lines.append(
                json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": body})
            )
    path.write_text("\n".join([*lines, *extra]) + "\n")


def ids(path) -> list[str]:
    return [json.loads(x)["custom_id"] for x in path.read_text().splitlines()] if path.exists() else []


def test_a_job_interrupted_halfway_and_resumed_yields_every_custom_id_exactly_once(fleet, tmp_path):
    src, out, err = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    write_input(src, 400)

    async def interrupted() -> None:
        async with AsyncClient([w.url for w in fleet]) as client:
            task = asyncio.create_task(BatchJob(client, src, out, err).run())
            while len(ids(out)) < 150:
                await asyncio.sleep(0.02)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(interrupted())
    first = ids(out)
    assert 150 <= len(first) < 400

    async def resumed():
        async with AsyncClient([w.url for w in fleet]) as client:
            return await BatchJob(client, src, out, err).run()

    summary = asyncio.run(resumed())
    assert summary.skipped == len(first)
    assert summary.succeeded == 400 - len(first)
    everything = ids(out)
    assert sorted(everything) == sorted(f"r{i}" for i in range(400))  # each exactly once
    assert ids(err) == []
    record = json.loads(out.read_text().splitlines()[0])
    assert record["response"]["status_code"] == 200 and record["response"]["body"]["choices"]


def test_bad_lines_and_failed_requests_land_in_the_error_file_and_the_rest_runs(fleet, tmp_path):
    src, out, err = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    bad = [
        "{not json",
        json.dumps({"custom_id": "r1", "url": "/v1/completions", "body": {"prompt": "x"}}),  # duplicate
        json.dumps({"custom_id": "neg", "url": "/v1/completions", "body": {"prompt": "x", "max_tokens": -2}}),
    ]
    write_input(src, 20, bad)

    async def run():
        async with AsyncClient(fleet[0].url) as client:
            return await BatchJob(client, src, out, err).run()

    summary = asyncio.run(run())
    assert (summary.succeeded, summary.failed) == (20, 3)
    errors = {json.loads(x)["line"]: json.loads(x) for x in err.read_text().splitlines()}
    assert errors[21]["error"]["code"] == "invalid_json"
    assert errors[22]["error"]["code"] == "duplicate_custom_id"
    assert errors[23]["response"]["status_code"] == 400
    assert "max_tokens" in errors[23]["response"]["body"]["error"]["message"]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "tokenmill.cli.main", "batch", "run", *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={"COLUMNS": "200", "PATH": ""}
    )


def test_a_rerun_of_a_job_with_lines_failed_for_good_still_exits_1(fleet, tmp_path):
    src = tmp_path / "jobs.jsonl"
    write_input(src, 3, ["{not json"])
    first = run_cli(str(src), "--url", fleet[0].url)
    assert first.returncode == 1 and "3 succeeded, 1 failed" in first.stderr, first.stderr
    again = run_cli(str(src), "--url", fleet[0].url)  # nothing left to send: the job still has a failure
    assert again.returncode == 1, again.stderr
    assert "0 succeeded, 0 failed, 4 done before (1 of them failed)" in again.stderr


def test_cli_runs_a_job_over_several_workers_and_reports_the_spread(fleet, tmp_path):
    src = tmp_path / "jobs.jsonl"
    write_input(src, 60)
    result = run_cli(str(src), "--url", fleet[0].url, "--url", fleet[1].url)
    assert result.returncode == 0, result.stderr
    assert "60 succeeded, 0 failed" in result.stderr
    assert sorted(ids(tmp_path / "jobs.output.jsonl")) == sorted(f"r{i}" for i in range(60))
    assert "sim-0" in result.stderr and "sim-1" in result.stderr  # the spread table


def test_cli_stops_on_a_refused_key_and_on_a_dead_server_keeping_what_finished(tmp_path):
    worker = start_server("--runner", "simulated", "--api-key", "right")
    try:
        src = tmp_path / "jobs.jsonl"
        write_input(src, 10)
        result = run_cli(str(src), "--url", worker.url, "--api-key", "wrong")
        assert result.returncode == 2
        assert f"{worker.url} refused the API key (401)" in result.stderr.replace("\n", "")
        result = run_cli(str(src), "--url", worker.url, "--api-key", "right")
        assert result.returncode == 0, result.stderr  # lines refused for the key are sent again
        assert sorted(ids(tmp_path / "jobs.output.jsonl")) == sorted(f"r{i}" for i in range(10))
    finally:
        worker.stop()
    fresh = tmp_path / "more.jsonl"
    write_input(fresh, 5)
    result = run_cli(str(fresh), "--url", worker.url, "--max-retries", "1")  # the worker is gone now
    assert result.returncode == 2
    assert "no endpoint could be reached" in result.stderr and "resume" in result.stderr
    retryable = [
        json.loads(x)["retryable"] for x in (tmp_path / "more.errors.jsonl").read_text().splitlines()
    ]
    assert retryable and all(retryable)  # a later run sends them again


def test_cli_names_bad_options(tmp_path):
    src = tmp_path / "jobs.jsonl"
    write_input(src, 1)
    result = run_cli(str(src), "--mode", "fast")
    assert result.returncode == 2 and "--mode='fast' is invalid: allowed throughput, latency" in result.stderr
    result = run_cli(str(tmp_path / "missing.jsonl"))
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_lines_the_client_cannot_read_are_failed_lines_and_the_rest_runs(fleet, tmp_path):
    """Before: the client raised preparing them, the tasks died unseen, and the job said 1 succeeded,
    0 failed. Now each is in the errors (refused locally, or by the worker naming the field)."""
    src, out, err = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    bodies = {
        "abc": '{"prompt": "x", "max_tokens": "abc"}',
        "nan": '{"prompt": "x", "max_tokens": NaN}',
        "inf": '{"prompt": "x", "max_tokens": Infinity}',
        "n": '{"prompt": "x", "max_tokens": 4, "n": "many"}',
        "list": '{"prompt": "x", "max_tokens": [4]}',
        "ok": '{"prompt": "x", "max_tokens": 4}',
    }
    lines = [f'{{"custom_id": "{k}", "url": "/v1/completions", "body": {b}}}' for k, b in bodies.items()]
    lines.insert(3, '{"custom_id": "chat", "url": "/v1/chat/completions", "body": {"messages": 5}}')
    src.write_text("\n".join(lines) + "\n")

    async def run():
        async with AsyncClient(fleet[0].url) as client:
            return await BatchJob(client, src, out, err).run()

    summary = asyncio.run(run())
    assert (summary.succeeded, summary.failed) == (1, 6)
    assert ids(out) == ["ok"]
    assert sorted(ids(err)) == sorted(["abc", "nan", "inf", "chat", "n", "list"])  # each once
    for record in map(json.loads, err.read_text().splitlines()):
        assert record["retryable"] is False  # the line's fault: a run again would fail it again
        assert record["error"] or record["response"]["status_code"] == 400


def test_a_line_larger_than_the_token_quota_fails_at_once_and_the_others_go(fleet, tmp_path):
    """Before: it was computed to wait for years, holding every later line behind it."""
    src, out, err = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    write_input(src, 6, [json.dumps({"custom_id": "huge", "url": "/v1/completions",
                                     "body": {"prompt": "x", "max_tokens": 10**12}})])  # fmt: skip

    async def run():
        async with AsyncClient(fleet[0].url, tokens_per_minute=100_000) as client:
            return await asyncio.wait_for(BatchJob(client, src, out, err).run(), 60)

    summary = asyncio.run(run())
    assert (summary.succeeded, summary.failed) == (6, 1)
    (record,) = map(json.loads, err.read_text().splitlines())
    assert record["custom_id"] == "huge" and record["error"]["code"] == "exceeds_quota"
    assert (
        "max_tokens" in record["error"]["message"]
        and "tokens_per_minute=100000" in record["error"]["message"]
    )
    assert record["retryable"] is True  # the run's quota is at fault: a run with a larger one sends it


class StandIn:
    """Just what BatchJob uses of an AsyncClient; ``answer`` gives each request's reply or raises."""

    def __init__(self, answer):
        self.concurrency_limit = 4
        self.answer = answer
        self.dispatcher = SimpleNamespace(gate=SimpleNamespace(in_flight=0), request=self._request)

    def prepare_call(self, path: str, body: dict[str, Any]) -> Any:
        if body.get("max_tokens") == "abc":
            raise ValueError("invalid literal for int() with base 10: 'abc'")
        return SimpleNamespace(path=path, body=body)

    async def _request(self, call: Any) -> Reply:
        await asyncio.sleep(0)
        return Reply(self.answer(call.body), None, "http://stand-in")


def run_job(tmp_path, lines: list[dict[str, Any]], answer) -> tuple[Any, list[dict[str, Any]], list[str]]:
    src, out, err = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    summary = asyncio.run(BatchJob(StandIn(answer), src, out, err).run())  # type: ignore[arg-type]
    return summary, [json.loads(x) for x in err.read_text().splitlines()], ids(out)


def completion(prompt: str, usage: Any) -> dict[str, Any]:
    return {"id": "cmpl-1", "choices": [{"index": 0, "text": prompt}], "usage": usage}


def request(custom_id: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "url": "/v1/completions", "body": {"prompt": custom_id, **body}}


def ok_or(e: BaseException):
    """Answers every request but the one for "bad", which raises ``e``."""

    def answer(body: dict[str, Any]) -> dict[str, Any]:
        if body["prompt"] == "bad":
            raise e
        return completion(body["prompt"], {"prompt_tokens": 1, "completion_tokens": 2})

    return answer


@pytest.mark.parametrize(
    ("bad", "answer", "code", "retryable"),
    [
        (request("bad", max_tokens="abc"), ok_or(RuntimeError("not sent")), "invalid_body", False),
        (request("bad"), ok_or(ValueError("invalid literal for int(): 'x'")), "client_error", True),
        (request("bad"), ok_or(QuotaExceeded("more than tokens_per_minute=10")), "exceeds_quota", True),
        (request("bad"), ok_or(UnicodeEncodeError("utf-8", "\ud800", 0, 1, "lone")), "invalid_body", False),
    ],
    ids=["prepare-fails", "request-raises", "over-quota", "lone-surrogate-in-body"],
)  # fmt: skip
def test_every_way_a_request_fails_is_a_failed_line_never_a_lost_one(tmp_path, bad, answer, code, retryable):
    summary, errors, done = run_job(tmp_path, [request("a"), bad, request("c")], answer)
    assert (summary.succeeded, summary.failed) == (2, 1)
    assert sorted(done) == ["a", "c"]
    (record,) = errors
    assert record["custom_id"] == "bad" and record["line"] == 2
    assert record["error"]["code"] == code and record["retryable"] is retryable


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": "x", "completion_tokens": None},
        {"prompt_tokens": 1, "completion_tokens": math.nan},
        [1, 2],
    ],
    ids=["text", "nan", "list"],
)
def test_an_answer_whose_usage_is_not_counts_is_a_failed_line_that_keeps_the_body(tmp_path, usage):
    summary, errors, done = run_job(
        tmp_path,
        [request("a"), request("bad")],
        lambda body: completion(body["prompt"], usage if body["prompt"] == "bad" else {"prompt_tokens": 3}),
    )
    assert (summary.succeeded, summary.failed, summary.prompt_tokens) == (1, 1, 3)
    assert done == ["a"]
    (record,) = errors
    assert record["custom_id"] == "bad" and record["error"]["code"] == "invalid_response"
    assert record["response"]["body"]["choices"][0]["text"] == "bad"
    assert record["retryable"] is True  # the server's fault, as a 5xx: a run again asks again


def test_a_failure_to_write_the_results_stops_the_job_with_it(tmp_path, monkeypatch):
    """Before: the task's OSError was never retrieved ("Task exception was never retrieved") and the
    job reported success with the line in neither file."""

    def full(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(BatchJob, "_record", full)
    with pytest.raises(OSError, match="No space left"):
        run_job(tmp_path, [request("a"), request("b")], lambda body: completion("x", None))


def test_a_custom_id_first_on_a_bad_line_is_a_duplicate_later_and_across_a_resume(tmp_path):
    """Before: the bad line's id was not taken, so x was in both the errors and the output."""
    lines = [{"custom_id": "x", "url": "/v1/nope", "body": {}}, request("x"), request("y")]
    answer = lambda body: completion(body["prompt"], None)  # noqa: E731
    _, errors, done = run_job(tmp_path, lines, answer)
    assert done == ["y"] and [(e["custom_id"], e["error"]["code"]) for e in errors] == [
        ("x", "invalid_url"),
        ("x", "duplicate_custom_id"),
    ]
    # Interrupted after the bad line: the run that resumes must flag line 2 all the same.
    err = tmp_path / "err.jsonl"
    err.write_text(err.read_text().splitlines()[0] + "\n")
    (tmp_path / "out.jsonl").unlink()
    _, errors, done = run_job(tmp_path, lines, answer)
    assert done == ["y"] and [e["error"]["code"] for e in errors] == ["invalid_url", "duplicate_custom_id"]


def test_a_lone_surrogate_in_an_id_or_an_answer_is_recorded_not_a_crash(tmp_path):
    """JSON's "\\ud800" decodes to text UTF-8 cannot hold: the id is a bad line, the answer is kept
    as an escape (and read back by the resume)."""
    src = tmp_path / "in.jsonl"
    lines = [request("a"), request("b")]
    text = (
        "".join(json.dumps(x) + "\n" for x in lines)
        + '{"custom_id": "\\ud800", "url": "/v1/completions", "body": {}}\n'
    )
    src.write_text(text)
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    stand_in = StandIn(lambda body: completion("odd \udc00" if body["prompt"] == "b" else "ok", None))
    summary = asyncio.run(BatchJob(stand_in, src, out, err).run())  # type: ignore[arg-type]
    assert (summary.succeeded, summary.failed) == (2, 1)
    (record,) = map(json.loads, err.read_text().splitlines())
    assert record["line"] == 3 and record["error"]["code"] == "invalid_custom_id"
    assert {
        json.loads(x)["response"]["body"]["choices"][0]["text"] for x in out.read_text().splitlines()
    } == {
        "ok",
        "odd \udc00",
    }
    summary = asyncio.run(BatchJob(stand_in, src, out, err).run())  # type: ignore[arg-type]
    assert summary.skipped == 3 and summary.succeeded == summary.failed == 0


def test_cli_refuses_bad_values_before_any_work(tmp_path):
    """Before: port 99999 ended "0 succeeded, 0 failed" (exit 0); --timeout 0 or nan and a priority
    past int32 were taken, and every line then failed (the priority ones stored as final)."""
    src = tmp_path / "jobs.jsonl"
    write_input(src, 1)
    for args, says in [
        (["--url", "http://127.0.0.1:99999"], "--url 'http://127.0.0.1:99999' is invalid"),
        (["--timeout", "0"], "--timeout=0.0 is invalid: allowed a number of seconds > 0"),
        (["--timeout", "-1"], "--timeout=-1.0 is invalid"),
        (["--timeout", "nan"], "--timeout=nan is invalid"),
        (["--priority", str(10**20)], f"--priority={10**20} is invalid: allowed an integer from -2147483648"),
    ]:  # fmt: skip
        result = run_cli(str(src), *args, "--max-retries", "0", timeout=60)
        assert result.returncode == 2, (args, result.stderr)
        assert says in result.stderr.replace("\n", ""), (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "jobs.output.jsonl").exists()


def test_cli_refuses_results_paths_that_are_not_files_it_can_write(tmp_path):
    """Before: a folder or a missing folder was a traceback, a pipe (/dev/stdout captured) not
    seekable, and /dev/full hung reading endless zeros."""
    src = tmp_path / "jobs.jsonl"
    write_input(src, 1)
    (tmp_path / "folder").mkdir()
    cases = [
        ("--output", str(tmp_path / "folder"), "it is a folder"),
        ("--errors", str(tmp_path / "missing" / "e.jsonl"), "does not exist"),
        ("--output", "/dev/stdout", "not a regular file"),  # a pipe under capture_output
        ("--errors", "/dev/full", "not a regular file"),
    ]
    for option, path, says in cases:
        if not os.path.exists("/dev/full") and path == "/dev/full":
            continue
        result = run_cli(str(src), "--url", "http://127.0.0.1:9", option, path, timeout=30)
        assert result.returncode == 2, (option, path, result.stderr)
        message = result.stderr.replace("\n", "")
        assert f"{option} {path} is invalid" in message and says in message and "allowed a regular" in message
        assert "Traceback" not in result.stderr
