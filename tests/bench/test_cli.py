"""``tokenmill bench`` as a user runs it: mock server, run, files, Ctrl-C, report, bad options."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ENV = {**os.environ, "COLUMNS": "200"}
TOKENMILL = [sys.executable, "-m", "tokenmill.cli.main"]


@pytest.fixture(scope="module")
def mock_url():
    cmd = [*TOKENMILL, "bench", "mock-server", "--port", "0", "--ttft", "0.05", "--itl", "0.005"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=ENV)
    line = proc.stderr.readline()
    assert "ready: " in line, line
    yield line.split("ready: ")[1].split("/v1")[0]
    proc.terminate()
    proc.wait()


def bench(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*TOKENMILL, "bench", *args], capture_output=True, text=True, env=ENV, timeout=timeout
    )


def test_a_run_prints_the_report_and_writes_log_summary_and_csv(mock_url, tmp_path):
    prefix = tmp_path / "out" / "run"
    load = ["--requests", "12", "--concurrency", "4", "--prompt-tokens", "20", "--output-tokens", "10"]
    extras = ["--slo", "ttft=0.5,tpot=0.05", "--gpu-cost-per-hour", "3", "-o", str(prefix)]
    done = bench("run", mock_url, *load, *extras)
    assert done.returncode == 0, done.stderr
    assert (
        "TTFT" in done.stdout
        and "goodput (ttft=0.5,tpot=0.05)" in done.stdout
        and "per million" in done.stdout
    )
    summary = json.loads((tmp_path / "out" / "run.json").read_text())
    assert summary["summary"]["succeeded"] == 12 and summary["summary"]["good"] == 12
    assert "TTFT: first message with content - anchor." in summary["formulas"]
    assert summary["run"]["profile"] == "concurrency 4"
    lines = (tmp_path / "out" / "run.events.jsonl").read_text().splitlines()
    assert len(lines) == 13 and json.loads(lines[1])["messages"]
    csv = (tmp_path / "out" / "run.csv").read_text().splitlines()
    assert csv[0].startswith("profile,requests") and csv[1].startswith("concurrency 4,12,0")

    again = bench("report", str(prefix) + ".events.jsonl", "--slo", "ttft=0.001")
    assert again.returncode == 0 and "0.0% of requests met every SLO" in again.stdout


def test_ctrl_c_stops_the_run_and_still_writes_what_was_measured(mock_url, tmp_path):
    prefix = tmp_path / "cut"
    load = ["--requests", "500", "--concurrency", "2", "--prompt-tokens", "5", "--output-tokens", "400"]
    cmd = [*TOKENMILL, "bench", "run", mock_url, *load, "-o", str(prefix)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    time.sleep(3.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "stopped early" in err
    summary = json.loads((tmp_path / "cut.json").read_text())
    assert summary["run"]["stopped_early"] and summary["summary"]["errors"].get("cancelled") == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--profile", "poisson"], "rate"),
        (["--profile", "sideways"], "profile must be one of"),
        (["--data", "sharegpt"], "--data-file"),
        (["--output-tokens", "0"], "--output-tokens"),
        (["--slo", "speed=1"], "--slo"),
        (["--endpoint", "embeddings"], "endpoint must be one of"),
    ],
)
def test_bad_options_exit_2_naming_them_and_send_nothing(mock_url, args, message):
    done = bench("run", mock_url, *args)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_an_unreachable_server_is_a_clear_error_within_seconds():
    start = time.perf_counter()
    done = bench("run", "http://127.0.0.1:9", "--requests", "3")
    assert done.returncode == 2 and "cannot connect to http://127.0.0.1:9" in done.stderr
    assert time.perf_counter() - start < 15
