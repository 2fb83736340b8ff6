"""``tokenmill batch`` against simulated workers: every custom_id exactly once across an interruption,
bad lines in the error file, a refused key or a dead server stops the job without losing work."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from tests.server.conftest import start_server
from tokenmill.client import AsyncClient
from tokenmill.client.batch import BatchJob


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


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "tokenmill.cli.main", "batch", "run", *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env={"COLUMNS": "200", "PATH": ""}
    )


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
