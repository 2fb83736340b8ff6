"""Chat template rendering as callers steer it: chat_template_kwargs and continue_final_message (QA 5, 6)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.server.conftest import start_server

HI = [{"role": "user", "content": "Hi"}]
DEMO_MODEL = Path(__import__("tokenmill.engine", fromlist=["_"]).__file__).parent / "demo_model"

# Put before the demo model's template: a loop over a template variable a request can set, and a
# call the sandbox forbids.
LOOP_AND_POKE = (
    "{% for i in range(loops | default(0)) %}.{% endfor %}{% if poke %}{{ messages.append(1) }}{% endif %}"
)


@pytest.fixture(scope="module")
def http(server):
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def looping_server(tmp_path_factory):
    """The demo model under a chat template that loops as many times as chat_template_kwargs says."""
    folder = tmp_path_factory.mktemp("looping") / "model"
    shutil.copytree(DEMO_MODEL, folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    # (and a variable that makes it write contents in capitals: such a final message cannot be found)
    template = config["chat_template"].replace(
        "message['content']", "(message['content'] | upper if shout else message['content'])"
    )
    config["chat_template"] = LOOP_AND_POKE + template
    config_path.write_text(json.dumps(config))
    s = start_server(str(folder), "--grpc-port", "-1", "--served-model-name", "demo")
    yield s
    s.stop()


def refused(http, path: str, body: dict) -> dict:
    resp = http.post(path, json=body)
    assert resp.status_code == 400, resp.text
    return resp.json()["error"]


# -- 5: chat_template_kwargs holds template variables, and a template's failure is a 400 ---------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
@pytest.mark.parametrize(
    "key", ["chat_template", "tokenize", "add_generation_prompt", "continue_final_message", "tools"]
)
def test_a_rendering_argument_in_chat_template_kwargs_is_refused(http, path, key):
    kwargs = {key: "{{ 'ROMEO:' }}" if key == "chat_template" else True}
    error = refused(http, path, {"messages": HI, "max_tokens": 1, "chat_template_kwargs": kwargs})
    assert error["param"] == f"chat_template_kwargs.{key}" and "not allowed" in error["message"], error


def test_a_template_variable_in_chat_template_kwargs_is_used(looping_server):
    with looping_server.client() as http:
        plain = http.post("/tokenize", json={"messages": HI}).json()
        looped = http.post("/tokenize", json={"messages": HI, "chat_template_kwargs": {"loops": 3}}).json()
        chat = http.post(
            "/v1/chat/completions",
            json={"messages": HI, "max_tokens": 1, "chat_template_kwargs": {"loops": 3}},
        ).json()
    assert looped["count"] > plain["count"] and chat["usage"]["prompt_tokens"] == looped["count"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
@pytest.mark.parametrize(
    ("kwargs", "param", "says"),
    [
        ({"loops": 1_000_000}, "chat_template_kwargs", "OverflowError"),  # over the sandbox's range limit
        ({"loops": "many"}, "chat_template_kwargs", "TypeError"),
        ({"poke": True}, "messages", "unsafe"),  # the sandbox's SecurityError
    ],
)
def test_a_template_that_trips_the_sandbox_is_a_400(looping_server, path, kwargs, param, says):
    with looping_server.client() as http:
        error = refused(http, path, {"messages": HI, "max_tokens": 1, "chat_template_kwargs": kwargs})
        assert http.get("/health").status_code == 200
    assert error["param"] == param and says in error["message"], error


# -- 6: continue_final_message leaves the final assistant message open -------------------------

PREFILL = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The King"}]
CONTINUE = {"messages": PREFILL, "add_generation_prompt": False, "continue_final_message": True}


def test_the_final_assistant_message_is_continued(http):
    closed = http.post("/tokenize", json={"messages": PREFILL, "add_generation_prompt": False}).json()
    opened = http.post("/tokenize", json=CONTINUE).json()
    text = http.post("/detokenize", json={"tokens": opened["tokens"]}).json()["prompt"]
    assert text.endswith("<|im_start|>assistant\nThe King")  # no end of turn after it
    assert opened["tokens"] == closed["tokens"][: opened["count"]] and opened["count"] < closed["count"]
    chat = http.post("/v1/chat/completions", json={**CONTINUE, "max_tokens": 4, "temperature": 0}).json()
    assert chat["usage"]["prompt_tokens"] == opened["count"]
    # the same continuation as completing the open prompt itself
    same = http.post(
        "/v1/completions", json={"prompt": opened["tokens"], "max_tokens": 4, "temperature": 0}
    ).json()
    assert chat["choices"][0]["message"]["content"] == same["choices"][0]["text"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
@pytest.mark.parametrize(
    ("change", "param", "says"),
    [
        ({"add_generation_prompt": True}, "continue_final_message", "add_generation_prompt false"),
        ({"add_generation_prompt": None}, "continue_final_message", "add_generation_prompt false"),
        ({"messages": HI}, "continue_final_message", "the assistant's"),
        (
            {"messages": [*HI, {"role": "assistant", "content": " "}]},
            "messages[1].content",
            "text to continue",
        ),
    ],
)
def test_continue_final_message_needs_an_assistant_message_to_continue(http, path, change, param, says):
    error = refused(http, path, {**CONTINUE, **change, "max_tokens": 1})
    assert error["param"] == param and says in error["message"], error


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
def test_a_final_message_the_template_changes_cannot_be_continued(looping_server, path):
    body = {**CONTINUE, "max_tokens": 1, "chat_template_kwargs": {"shout": True}}
    with looping_server.client() as http:
        error = refused(http, path, body)
        assert http.post(path, json={**body, "chat_template_kwargs": {}}).status_code == 200
    assert error["param"] == "messages" and "cannot be continued" in error["message"], error
