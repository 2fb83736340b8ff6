"""Comparing runs: differences with bootstrap intervals that separate real changes from luck."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys

import pytest

from tokenmill.bench.compare import Run, compare
from tokenmill.bench.data import RequestSpec
from tokenmill.bench.load import LoadProfile
from tokenmill.bench.metrics import summarize
from tokenmill.bench.mock_server import MockConfig, MockServer
from tokenmill.bench.records import RequestRecord, write_log
from tokenmill.bench.report import Cost, write_json
from tokenmill.bench.runner import LoadRunner, RunSettings


def saved_run(tmp_path, name: str, ttft: float, gpus: int = 1):
    async def main():
        async with MockServer(MockConfig(ttft=ttft, itl=0.002)) as server:
            settings = RunSettings(server.url, LoadProfile("concurrency", concurrency=8), max_tokens=8)
            return await LoadRunner(settings).run([RequestSpec(prompt=f"q {i}") for i in range(40)])

    records = asyncio.run(main())
    info = {"url": "mock", "profile": "concurrency 8"}
    write_log(tmp_path / f"{name}.events.jsonl", info, records)
    write_json(tmp_path / f"{name}.json", info, summarize(records), Cost(2.0, gpus))
    return tmp_path / f"{name}.json"


def test_a_real_change_is_significant_and_its_size_is_right(tmp_path):
    runs = [Run.load(saved_run(tmp_path, "base", 0.02)), Run.load(saved_run(tmp_path, "slow", 0.06, gpus=2))]
    table = compare(runs)
    ttft = table["ttft_p50"][1]
    assert ttft.delta == pytest.approx(40.0, abs=5.0) and ttft.significant and ttft.low > 30
    assert table["ttft_p50"][0].delta is None  # the baseline
    assert runs[1].gpus == 2 and runs[1].cost_per_million is not None


def test_a_run_against_itself_differs_by_nothing(tmp_path):
    path = saved_run(tmp_path, "same", 0.02)
    table = compare([Run.load(path, "a"), Run.load(path, "b")])
    for rows in table.values():
        assert rows[1].delta == 0.0 and not rows[1].significant


def test_a_run_without_its_event_log_is_refused(tmp_path):
    (tmp_path / "lonely.json").write_text("{}")
    with pytest.raises(ValueError, match=r"no event log lonely\.events\.jsonl"):
        Run.load(tmp_path / "lonely.json")


def test_the_command_prints_the_table_and_writes_pareto_plots(tmp_path):
    a, b = saved_run(tmp_path, "a", 0.02), saved_run(tmp_path, "b", 0.05)
    cmd = [sys.executable, "-m", "tokenmill.cli.main", "bench", "compare", str(a), str(b)]
    cmd += ["--labels", "x,y", "--html", str(tmp_path / "cmp.html")]
    done = subprocess.run(cmd, capture_output=True, text=True, env={"COLUMNS": "200", **_env()}, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "TTFT p50 ms" in done.stdout and "against x" in done.stdout
    html = (tmp_path / "cmp.html").read_text()
    assert "<svg" in html and "TTFT p99 ms" in html

    bad = subprocess.run([*cmd[:5], str(a)], capture_output=True, text=True, env=_env(), timeout=60)
    assert bad.returncode == 2 and "at least two runs" in bad.stderr


def _env():
    import os

    return dict(os.environ)


def failed_run(tmp_path, name: str):
    records = [
        RequestRecord(i, None, sent=0.0, end=0.5, status=500, error_kind="http_5xx", error="boom")
        for i in range(4)
    ]
    write_log(tmp_path / f"{name}.events.jsonl", {"url": "mock"}, records)
    return Run.load(tmp_path / f"{name}.events.jsonl")


def test_throughput_gets_no_degenerate_interval(tmp_path):
    # Fixed output lengths: resampling requests gave every sample the same token sum, a
    # zero-width interval flagged significant. Throughput is one figure per run: no interval.
    runs = [Run.load(saved_run(tmp_path, "base", 0.02)), Run.load(saved_run(tmp_path, "slow", 0.06))]
    tput = compare(runs)["output_tok_s"][1]
    assert tput.delta is not None and tput.delta < 0
    assert tput.low is None and tput.high is None and not tput.significant


def test_a_run_without_successes_has_zero_throughput_not_nan(tmp_path):
    runs = [Run.load(saved_run(tmp_path, "base", 0.02)), failed_run(tmp_path, "down")]
    table = compare(runs)
    assert table["output_tok_s"][1].value == 0.0
    assert table["output_tok_s"][1].delta == pytest.approx(-table["output_tok_s"][0].value)
    assert math.isnan(table["ttft_p50"][1].value)  # no request to time: unknown, not zero


def test_a_log_under_another_name_is_compared_as_bench_report_reads_it(tmp_path):
    """Before: a log copied to a.jsonl was refused ("no event log a.jsonl.events.jsonl beside
    it"), though bench report read it."""
    base = saved_run(tmp_path, "base", 0.02)
    copy = tmp_path / "copy.jsonl"
    copy.write_text((tmp_path / "base.events.jsonl").read_text())
    runs = [Run.load(base), Run.load(copy)]
    assert runs[1].label == "copy.jsonl" and compare(runs)["ttft_p50"][1].delta == 0.0
