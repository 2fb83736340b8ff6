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
        ("/v1/chat/completions", CHAT, [*SHARED_NULLS, "logprobs", "add_generation_prompt", "echo"]),
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


# -- 3: vLLM's structured output and OpenAI's legacy fields are refused, not ignored -----------

STRUCTURED = {
    "guided_json": {"type": "object"},
    "guided_regex": "yes|no",
    "guided_choice": ["yes", "no"],
    "guided_grammar": 'root ::= "yes"',
    "guided_decoding_backend": "xgrammar",
    "guided_whitespace_pattern": " *",
    "structured_outputs": {"choice": ["yes", "no"]},
    "prompt_logprobs": 0,
}
CHAT_ONLY = {
    "functions": [{"name": "f", "parameters": {}}],
    "function_call": {"name": "f"},
    "chat_template": "{{ 'ROMEO:' }}",
}


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [("/v1/completions", k, v) for k, v in STRUCTURED.items()]
    + [("/v1/chat/completions", k, v) for k, v in {**STRUCTURED, **CHAT_ONLY}.items()],
)
def test_a_field_tokenmill_cannot_honour_is_a_400_naming_it(http, path, field, value):
    body = COMPLETION if path == "/v1/completions" else CHAT
    error = post(http, path, {**body, field: value})
    assert error["param"] == field and "not supported by tokenmill" in error["message"], error


@pytest.mark.parametrize("empty", [None, "", [], {}])
def test_those_fields_null_or_empty_are_accepted(http, empty):
    fields = dict.fromkeys([*STRUCTURED, *CHAT_ONLY], empty)
    assert http.post("/v1/chat/completions", json={**CHAT, **fields}).status_code == 200
    assert http.post("/v1/completions", json={**COMPLETION, **fields}).status_code == 200


def test_function_call_none_or_auto_without_functions_is_accepted(http):
    for value in ("none", "auto"):
        assert http.post("/v1/chat/completions", json={**CHAT, "function_call": value}).status_code == 200


@pytest.mark.parametrize("field", ["tool_calls", "function_call"])
def test_assistant_tool_calls_in_the_history_are_refused(http, field):
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    value = [call] if field == "tool_calls" else call["function"]
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": None, field: value},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]
    error = post(http, "/v1/chat/completions", {**CHAT, "messages": messages})
    assert error["param"] == f"messages[1].{field}" and "not supported" in error["message"], error


# -- 8: echo with logprobs would need the prompt's logprobs: refused, not half answered ----------


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_logprobs_is_refused(http, stream):
    error = post(http, "/v1/completions", {**COMPLETION, "echo": True, "logprobs": 0, "stream": stream})
    assert error["param"] == "logprobs" and "prompt logprobs are not supported" in error["message"], error


def test_chat_echo_puts_the_assistants_last_message_before_the_reply(client):
    """vLLM's chat ``echo``: it was taken for an unknown field, logged and ignored."""
    continued = [
        {"role": "user", "content": "Tell me a story"},
        {"role": "assistant", "content": "Once upon"},
    ]
    kwargs = dict(model="demo", max_tokens=4, temperature=0)
    extra = {"continue_final_message": True, "add_generation_prompt": False}
    plain = client.chat.completions.create(messages=continued, extra_body=extra, **kwargs)
    echoed = client.chat.completions.create(messages=continued, extra_body={**extra, "echo": True}, **kwargs)
    assert echoed.choices[0].message.content == "Once upon" + plain.choices[0].message.content
    streamed = client.chat.completions.create(
        messages=continued, extra_body={**extra, "echo": True}, stream=True, **kwargs
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == echoed.choices[0].message.content
    # The last message is the user's: the reply's role is not its role, nothing is put before it.
    asked = [{"role": "user", "content": "Hi"}]
    assert (
        client.chat.completions.create(messages=asked, extra_body={"echo": True}, **kwargs).choices[0].message
        == client.chat.completions.create(messages=asked, **kwargs).choices[0].message
    )


@pytest.mark.parametrize("stream", [False, True])
def test_chat_echo_with_logprobs_is_refused(http, stream):
    error = post(http, "/v1/chat/completions", {**CHAT, "echo": True, "logprobs": True, "stream": stream})
    assert error["param"] == "logprobs" and "prompt logprobs are not supported" in error["message"], error


def test_echo_without_logprobs_and_logprobs_without_echo_still_work(http):
    echoed = http.post("/v1/completions", json={**COMPLETION, "echo": True}).json()["choices"][0]
    assert echoed["text"].startswith("ROMEO:") and echoed["logprobs"] is None
    scored = http.post("/v1/completions", json={**COMPLETION, "logprobs": 1}).json()["choices"][0]
    assert len(scored["logprobs"]["tokens"]) == 2 and scored["logprobs"]["text_offset"][0] == 0


# -- 13: best_of on chat is checked as on completions --------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_best_of_must_equal_n(http, path):
    body = COMPLETION if path == "/v1/completions" else CHAT
    error = post(http, path, {**body, "best_of": 2})
    assert error["param"] == "best_of" and "allowed null or n (1)" in error["message"], error
    same = http.post(path, json={**body, "n": 2, "best_of": 2, "temperature": 1})
    assert same.status_code == 200 and len(same.json()["choices"]) == 2


# -- 14: seed is an int64, as in vLLM and over gRPC ------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("seed", [2**63, 2**64, 2**100, -(2**63) - 1])
def test_a_seed_outside_int64_is_refused(http, path, seed):
    body = COMPLETION if path == "/v1/completions" else CHAT
    error = post(http, path, {**body, "seed": seed})
    assert error["param"] == "seed", error


@pytest.mark.parametrize("seed", [2**63 - 1, -(2**63), 0])
def test_a_seed_at_the_int64_bounds_is_accepted(http, seed):
    assert http.post("/v1/completions", json={**COMPLETION, "seed": seed}).status_code == 200


# -- 16: stream_options needs stream, and its keys are checked ----------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("stream", [False, None])
def test_stream_options_without_stream_is_refused(http, path, stream):
    body = COMPLETION if path == "/v1/completions" else CHAT
    error = post(http, path, {**body, "stream": stream, "stream_options": {"include_usage": True}})
    assert error["param"] == "stream_options" and "stream=true" in error["message"], error
    for empty in (None, {}):  # nothing asked: as vLLM, accepted
        assert http.post(path, json={**body, "stream_options": empty}).status_code == 200


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_an_unknown_stream_option_is_refused(http, path):
    body = COMPLETION if path == "/v1/completions" else CHAT
    error = post(http, path, {**body, "stream": True, "stream_options": {"include_usag": True}})
    assert error["param"] == "stream_options.include_usag", error


# -- 19: a bad token id names prompt, the API's field --------------------------------------------


@pytest.mark.parametrize("prompt", [[99999], [[5, 6], [7, -1]]])
def test_a_bad_token_id_names_prompt(http, prompt):
    error = post(http, "/v1/completions", {**COMPLETION, "prompt": prompt})
    assert error["param"] == "prompt" and "token id" in error["message"], error
    assert "prompt_token_ids" not in error["message"], error
