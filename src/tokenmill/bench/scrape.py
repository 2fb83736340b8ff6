"""The server's side of a run: its Prometheus metrics, sampled while the load runs (``--metrics-url``).

Latency alone cannot say whether a server was saturated or idle; its own
gauges can. tokenmill's names and vLLM's are both read (SGLang and others that
export vLLM's names work too); each sample sums a gauge over its label sets.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families

from tokenmill.client import HTTPTransport, TransportError

# What a report shows -> the gauge names servers export for it, first found wins.
GAUGES: dict[str, tuple[str, ...]] = {
    "running": ("tokenmill_requests_running", "vllm:num_requests_running", "sglang:num_running_reqs"),
    "waiting": ("tokenmill_requests_waiting", "vllm:num_requests_waiting", "sglang:num_queue_reqs"),
    "kv_usage": ("tokenmill_kv_cache_usage_ratio", "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    "busy": ("tokenmill_engine_busy_ratio",),
}


@dataclass
class MetricsSample:
    time: float  # seconds from the run's start
    url: str
    values: dict[str, float] = field(default_factory=dict)


def parse_gauges(text: str) -> dict[str, float]:
    """The report's gauges from a Prometheus text exposition."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name] = found.get(sample.name, 0.0) + float(sample.value)
    values = {}
    for key, names in GAUGES.items():
        for name in names:
            if name in found:
                values[key] = found[name]
                break
    return values


class MetricsScraper:
    """Polls every URL each ``interval`` seconds from ``start()`` until ``stop()``."""

    def __init__(self, urls: list[str], interval: float = 1.0) -> None:
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"--metrics-url must be like http://host:port/metrics, got {url!r}")
        if not interval > 0:
            raise ValueError(f"the scrape interval must be > 0, got {interval}")
        self.urls = urls
        self.interval = interval
        self.samples: list[MetricsSample] = []
        self.errors: dict[str, str] = {}  # url -> the last failure
        self._task: asyncio.Task[None] | None = None
        self._started = 0.0

    def start(self, started: float) -> None:
        self._started = started
        self._task = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _poll(self) -> None:
        transports = {}
        for url in self.urls:
            parts = urlsplit(url)
            transports[url] = (
                HTTPTransport(f"{parts.scheme}://{parts.netloc}", read_timeout=5.0),
                parts.path or "/",
            )
        try:
            while True:
                await asyncio.gather(*(self._scrape(url, *transports[url]) for url in self.urls))
                await asyncio.sleep(self.interval)
        finally:
            for http, _ in transports.values():
                await http.aclose()

    async def _scrape(self, url: str, http: HTTPTransport, path: str) -> None:
        at = time.perf_counter() - self._started
        try:
            response = await http.request("GET", path)
            if response.status != 200:
                self.errors[url] = f"HTTP {response.status}"
                return
            self.samples.append(MetricsSample(at, url, parse_gauges(response.text)))
        except (TransportError, ValueError) as e:
            self.errors[url] = str(e)

    def summary(self) -> dict[str, dict[str, float]]:
        """Mean and max of each gauge over the run, per URL."""
        out: dict[str, dict[str, float]] = {}
        for url in self.urls:
            samples = [s for s in self.samples if s.url == url]
            for key in GAUGES:
                values = [s.values[key] for s in samples if key in s.values]
                if values:
                    out.setdefault(url, {})[f"{key}_mean"] = sum(values) / len(values)
                    out[url][f"{key}_max"] = max(values)
        return out
