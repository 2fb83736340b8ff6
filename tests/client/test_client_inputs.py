"""What the SDK refuses, and how it says so, before anything reaches a worker."""

from __future__ import annotations

import asyncio
import socket

import pytest

from tokenmill.client import AsyncClient, Client, ConnectError
from tokenmill.client.endpoints import check_url


@pytest.mark.parametrize(
    ("key", "error"),
    [(5, TypeError), ("a\nb", ValueError), ("a\r\nx-evil: 1", ValueError), ("ключ", ValueError)],
)
def test_an_api_key_that_cannot_be_a_header_is_refused_when_the_client_is_made_without_echoing_it(key, error):
    """Before: taken, then every call failed with a ValueError that printed the key itself."""
    for make in (AsyncClient, Client):
        with pytest.raises(error, match=r"^api_key is invalid: allowed one line of latin-1 text") as caught:
            make("http://127.0.0.1:9", api_key=key)
        assert str(key) not in str(caught.value)


def test_a_bad_key_in_the_environment_is_named_by_its_variable(monkeypatch):
    monkeypatch.setenv("TOKENMILL_API_KEY", "sekret\n")
    with pytest.raises(ValueError, match=r"^\$TOKENMILL_API_KEY is invalid") as caught:
        AsyncClient("http://127.0.0.1:9")
    assert "sekret" not in str(caught.value)


def test_no_burst_must_be_a_bool():
    with pytest.raises(TypeError, match=r"^no_burst='yes' is invalid: allowed True or False"):
        AsyncClient("http://127.0.0.1:9", no_burst="yes")


@pytest.mark.parametrize("url", ["http://[/x]", "http://h[b]:80", "http://[::1"])
def test_urls_with_stray_brackets_are_named_like_any_bad_url(url):
    """Before: urlsplit's bare "Invalid IPv6 URL", naming neither the option nor the URL."""
    with pytest.raises(ValueError, match=r"^--url .* is invalid: allowed http://host:port"):
        check_url(url, "--url")


def test_a_grpc_address_nobody_answers_is_named_in_the_connect_error():
    """Before: "cannot connect to failed to connect to all addresses; ...": no address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"

    async def run() -> None:
        async with AsyncClient(dead, transport="grpc", max_retries=0) as client:
            await client.completions.create(prompt="x", max_tokens=2)

    with pytest.raises(ConnectError, match=rf"^cannot connect to grpc://{dead}: "):
        asyncio.run(run())
