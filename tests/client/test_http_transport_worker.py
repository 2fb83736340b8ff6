"""HTTPTransport against a real ``tokenmill serve``: OpenAI streams, worker header, disconnects."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.server.conftest import start_server
from tokenmill.client import HTTPTransport
from tokenmill.protocol.headers import WORKER_HEADER


@pytest.fixture(scope="module")
def worker():
    server = start_server()
    yield server
    server.stop()


def test_a_streamed_chat_arrives_as_one_event_per_token_then_usage_and_done(worker):
    async def main():
        body = {
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 12,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with (
            HTTPTransport(worker.url) as http,
            http.stream("POST", "/v1/chat/completions", json=body) as r,
        ):
            return r.status, r.headers, [e async for e in r.events()]

    status, headers, events = asyncio.run(main())
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert headers[WORKER_HEADER]
    assert events[-1].data == "[DONE]"
    chunks = [json.loads(e.data) for e in events[:-1]]
    token_chunks = [c for c in chunks if c["choices"]]
    assert len(token_chunks) == 12 and token_chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["usage"]["completion_tokens"] == 12
    times = [e.time for e in events]
    assert times == sorted(times)


def test_leaving_a_stream_early_frees_the_request_on_the_worker(worker):
    async def main():
        body = {"prompt": "ROMEO:", "max_tokens": 1000, "ignore_eos": True, "stream": True}
        async with HTTPTransport(worker.url) as http:
            async with http.stream("POST", "/v1/completions", json=body) as r:
                async for _ in r.events():
                    break
            models = await http.request("GET", "/v1/models")
            return models.json()

    assert asyncio.run(main())["data"][0]["id"] == "demo"
    # 1000 tokens take the demo model far longer than this: only an abort ends the request in time.
    aborted = lambda: worker.metric("tokenmill_requests_in_flight") == 0  # noqa: E731
    worker.wait_for(aborted, timeout=1.0, what="the request to be aborted")
    worker.wait_for(
        lambda: worker.metric("tokenmill_kv_cache_usage_ratio") == 0, what="its blocks to be freed"
    )
