"""Request fields as OpenAI's and vLLM's clients send them: nulls, and the fields tokenmill refuses.

Each test names the QA finding (/tmp/qa/compat.md) it guards against.
"""

from __future__ import annotations

import openai
import pytest

CHAT = {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
COMPLETION = {"model": "demo", "prompt": "ROMEO:", "max_tokens": 2}


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def http(server):
    with server.client() as c:
        yield c


def post(http, path: str, body: dict) -> dict:
    """The error of a request that must be refused: status 400, OpenAI's error body."""
    resp = http.post(path, json=body)
    assert resp.status_code == 400, resp.text
    return resp.json()["error"]


# -- 1: null means the default ------------------------------------------------------------------


def test_the_official_client_passing_none_is_the_default(client):
    chat = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=2,
        n=None,
        presence_penalty=None,
        frequency_penalty=None,
        logprobs=None,
    )
    assert len(chat.choices) == 1 and chat.choices[0].logprobs is None
    text = client.completions.create(model="demo", prompt="ROMEO:", max_tokens=2, n=None, echo=None)
    assert len(text.choices) == 1 and text.choices[0].text


SHARED_NULLS = [
    "n",
    "presence_penalty",
    "frequency_penalty",
    "stream",
    "stream_options",
    "min_tokens",
    "ignore_eos",
    "skip_special_tokens",
    "include_stop_str_in_output",
    "seed",
    "temperature",
]


@pytest.mark.parametrize(
    ("path", "body", "fields"),
    [
        ("/v1/chat/completions", CHAT, [*SHARED_NULLS, "logprobs", "add_generation_prompt"]),
        ("/v1/completions", COMPLETION, [*SHARED_NULLS, "echo", "logprobs", "best_of"]),
        ("/tokenize", {"prompt": "ROMEO:"}, ["add_special_tokens"]),
        ("/tokenize", {"messages": CHAT["messages"]}, ["add_generation_prompt"]),
    ],
)
def test_explicit_null_on_every_defaulted_field_is_accepted(http, path, body, fields):
    resp = http.post(path, json={**body, **dict.fromkeys(fields)})
    assert resp.status_code == 200, resp.text
    if path == "/tokenize":
        assert resp.json() == http.post(path, json=body).json()  # the same tokens as without the nulls
    else:
        assert len(resp.json()["choices"]) == 1


def test_null_inside_stream_options_is_the_default(http):
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": None, "continuous_usage_stats": True}}
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        assert sum(1 for line in resp.iter_lines() if line.startswith("data: ")) > 1


def test_null_on_max_tokens_still_means_no_limit(http):
    resp = http.post("/v1/completions", json={**COMPLETION, "max_tokens": None, "ignore_eos": True})
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] > 16


def test_the_schema_says_null_is_accepted(http):
    schemas = http.get("/openapi.json").json()["components"]["schemas"]
    n = schemas["ChatCompletionRequest"]["properties"]["n"]
    assert {"type": "null"} in n["anyOf"] and n["default"] == 1
    assert {"type": "null"} in schemas["CompletionRequest"]["properties"]["echo"]["anyOf"]


# -- 2: response_format is refused on completions as on chat -----------------------------------


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_response_format_other_than_text_is_refused(http, path):
    body = COMPLETION if path == "/v1/completions" else CHAT
    for kind in ("json_object", "json_schema"):
        error = post(http, path, {**body, "response_format": {"type": kind}})
        assert error["param"] == "response_format.type" and "'text'" in error["message"], error
    assert http.post(path, json={**body, "response_format": {"type": "text"}}).status_code == 200
