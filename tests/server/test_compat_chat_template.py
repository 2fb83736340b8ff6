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
    config["chat_template"] = LOOP_AND_POKE + config["chat_template"]
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
