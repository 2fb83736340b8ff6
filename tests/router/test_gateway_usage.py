"""What a request's usage row holds however it ends, through real HTTP on loopback."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.router.test_gateway import ADMIN, create_key, usage_rows
from tests.router.test_route import RouterProcess, Scripted

CONFIG = """
ledger: usage.db
prices:
  demo: {prompt: 1.0, completion: 2.0}
teams:
  t: {}
"""


def test_a_worker_that_dies_during_a_whole_response_leaves_the_prompt_charged(tmp_path: Path):
    """The QA repro: the worker killed during a non-streamed request, the client got 503 "every
    worker failed this request" and the row (unavailable) was charged nothing, though the worker
    had read the prompt."""
    config = tmp_path / "gateway.yaml"
    config.write_text(CONFIG)
    key = create_key(config, "t")
    dying = Scripted(lambda n: [None])  # reads the request, then its connection closes
    router = None
    try:
        router = RouterProcess(
            dying.url, extra=("--gateway-config", str(config)), env={"TOKENMILL_ADMIN_KEY": ADMIN}
        )
        body = {"model": "demo", "prompt": "Tell me a long story", "max_tokens": 200}
        headers = {"authorization": f"Bearer {key}"}
        r = httpx.post(f"{router.url}/v1/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 503 and "every worker failed" in r.json()["error"]["message"]
        gateway = type("G", (), {"config": config})
        (row,) = usage_rows(gateway, "t")
        assert (row["status"], row["http_status"], row["worker"]) == ("unavailable", 503, dying.url)
        assert row["prompt_tokens"] > 0 and row["completion_tokens"] == 0
        assert row["cost"] == pytest.approx(row["prompt_tokens"] * 1.0 / 1e6)
    finally:
        if router is not None:
            router.stop()
        dying.stop()
