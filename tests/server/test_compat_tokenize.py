"""``/tokenize`` renders messages as chat does, and a 500 anywhere keeps the connection (QA 4, 17)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.grpc_worker import demo_engine, make_worker
from tests.server.in_thread import serving_in_thread
from tokenmill.server.app import build_app

PARTS = [{"role": "user", "content": [{"type": "text", "text": "Hi, "}, {"type": "text", "text": "Romeo"}]}]


@pytest.fixture(scope="module")
def http(server):
    with server.client() as c:
        yield c


def refused(http: httpx.Client, body: dict) -> dict:
    resp = http.post("/tokenize", json=body)
    assert resp.status_code == 400, resp.text
    return resp.json()["error"]


def test_messages_with_content_parts_are_the_tokens_chat_is_served_with(http):
    tokens = http.post("/tokenize", json={"messages": PARTS})
    assert tokens.status_code == 200, tokens.text
    chat = http.post("/v1/chat/completions", json={"messages": PARTS, "max_tokens": 1}).json()
    assert tokens.json()["count"] == chat["usage"]["prompt_tokens"]
    joined = [{"role": "user", "content": "Hi, Romeo"}]
    assert tokens.json()["tokens"] == http.post("/tokenize", json={"messages": joined}).json()["tokens"]
    assert http.get("/health").status_code == 200  # on the same connection


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "valid string"),
        ({"messages": [{"role": "bogus", "content": "Hi"}]}, "messages[0].role", "'user'"),
        ({"messages": ["x"]}, "messages[0]", "valid dictionary"),
        ({"messages": []}, "messages", "at least 1"),
        ({"prompt": "Hi", "messages": PARTS}, "messages", "not both"),
        ({}, "prompt", "one of prompt or messages is required"),
        ({"messages": PARTS, "chat_template": "{{ 'x' }}"}, "chat_template", "not supported"),
        (
            {"messages": PARTS, "chat_template_kwargs": {"bos_token": "x"}},
            "chat_template_kwargs.bos_token",
            "template variables other than",
        ),
    ],
)
def test_a_bad_tokenize_body_is_a_400_naming_the_field(http, body, param, says):
    error = refused(http, body)
    assert error["param"] == param and says in error["message"], error
    assert "(and " not in error["message"], error  # no other branch of a union reported


@pytest.fixture(scope="module")
def failing_app_url() -> Iterator[str]:
    """The worker's app, served by uvicorn on loopback, with one extra route that fails."""
    engine = demo_engine()
    app = build_app(make_worker(engine))

    async def boom() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/boom", boom)
    with serving_in_thread(app) as (url, _):
        yield url
    engine.shutdown()


def test_an_unexpected_error_is_a_json_500_and_the_connection_stays_open(failing_app_url):
    with httpx.Client(base_url=failing_app_url, timeout=10) as http:
        failed = http.get("/boom")
        assert failed.status_code == 500
        assert failed.json()["error"] == {
            "message": "internal error: RuntimeError",
            "type": "internal_error",
            "param": None,
            "code": "internal_error",
        }
        assert failed.headers["x-tokenmill-worker"] == "test-worker"
        client_port = failed.extensions["network_stream"].get_extra_info("client_addr")
        health = http.get("/health")  # on the same pooled connection
        assert health.status_code == 200
        assert health.extensions["network_stream"].get_extra_info("client_addr") == client_port


def test_a_message_that_is_not_an_object_is_named_on_chat_too(http):
    error = http.post("/v1/chat/completions", json={"messages": ["x"]}).json()["error"]
    assert error["param"] == "messages[0]" and "valid dictionary" in error["message"], error
    body = http.post("/v1/chat/completions", json=["x"]).json()["error"]
    assert body["param"] is None and "not a valid JSON object" in body["message"], body
