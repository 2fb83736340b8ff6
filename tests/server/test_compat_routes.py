"""Routes as OpenAI's SDK and HTTP itself expect them (QA 15, 22)."""

from __future__ import annotations

import openai
import pytest


@pytest.fixture(scope="module")
def http(server):
    with server.client() as c:
        yield c


# -- 15: a 405 says which methods the route allows ---------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [("GET", "/v1/completions", "POST"), ("DELETE", "/tokenize", "POST"), ("POST", "/health", "GET")],
)
def test_a_405_names_the_allowed_methods(http, method, path, allow):
    resp = http.request(method, path)
    assert resp.status_code == 405 and resp.headers["allow"] == allow, resp.headers
    assert resp.json()["error"]["type"] == "invalid_request_error"
    assert resp.json()["error"]["message"] == f"{path} takes {allow}, not {method}"


# -- 22: GET /v1/models/{model} ----------------------------------------------------------------


def test_the_sdk_retrieves_the_served_model_as_listed(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    model = client.models.retrieve("demo")
    assert model == client.models.list().data[0] and model.id == "demo" and model.object == "model"
    for missing in ("gpt-5", "org/demo"):
        with pytest.raises(openai.NotFoundError) as e:
            client.models.retrieve(missing)
        assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
        assert repr(missing) in e.value.body["message"]
