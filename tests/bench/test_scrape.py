"""Server metrics during a run: tokenmill's and vLLM's gauge names, sampled over time."""

from __future__ import annotations

import asyncio
import time

import pytest

from tokenmill.bench.scrape import MetricsScraper, parse_gauges

TOKENMILL = """# HELP tokenmill_requests_running Requests running.
# TYPE tokenmill_requests_running gauge
tokenmill_requests_running{model_name="a"} 3.0
tokenmill_requests_running{model_name="b"} 2.0
# TYPE tokenmill_requests_waiting gauge
tokenmill_requests_waiting{model_name="a"} 7.0
# TYPE tokenmill_kv_cache_usage_ratio gauge
tokenmill_kv_cache_usage_ratio{model_name="a"} 0.25
# TYPE tokenmill_engine_busy_ratio gauge
tokenmill_engine_busy_ratio{model_name="a"} 0.9
"""

VLLM = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 4.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 1.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="m"} 0.5
"""


def test_gauges_are_summed_over_label_sets():
    assert parse_gauges(TOKENMILL) == {"running": 5.0, "waiting": 7.0, "kv_usage": 0.25, "busy": 0.9}


def test_vllm_names_are_read_too():
    assert parse_gauges(VLLM) == {"running": 4.0, "waiting": 1.0, "kv_usage": 0.5}


def test_the_scraper_samples_every_interval_and_summarizes():
    async def serve(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        body = TOKENMILL.encode()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        writer.close()

    async def main():
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        scraper = MetricsScraper([f"http://127.0.0.1:{port}/metrics"], interval=0.05)
        scraper.start(time.perf_counter())
        await asyncio.sleep(0.5)
        await scraper.stop()
        server.close()
        return scraper, port

    scraper, port = asyncio.run(main())
    assert 4 <= len(scraper.samples) <= 12
    times = [s.time for s in scraper.samples]
    assert times == sorted(times) and times[0] < 0.05
    summary = scraper.summary()[f"http://127.0.0.1:{port}/metrics"]
    assert summary["running_max"] == 5.0 and summary["busy_mean"] == pytest.approx(0.9)
    assert not scraper.errors


def test_an_unreachable_metrics_url_is_an_error_not_a_crash():
    async def main():
        scraper = MetricsScraper(["http://127.0.0.1:9/metrics"], interval=0.05)
        scraper.start(time.perf_counter())
        await asyncio.sleep(0.2)
        await scraper.stop()
        return scraper

    scraper = asyncio.run(main())
    assert not scraper.samples and "cannot connect" in scraper.errors["http://127.0.0.1:9/metrics"]


@pytest.mark.parametrize("url", ["localhost:8000/metrics", "ftp://x/metrics"])
def test_a_bad_metrics_url_is_refused(url):
    with pytest.raises(ValueError, match="--metrics-url"):
        MetricsScraper([url])
