"""Routes as OpenAI's SDK and HTTP itself expect them (QA 15, 22)."""

from __future__ import annotations

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
