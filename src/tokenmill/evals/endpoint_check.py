"""Is an endpoint usable at all? Checked once before the run, and on any failure during it.

Four failures are the endpoint's, not a question's, and no retry mends them:
it cannot be reached, it refuses the key (401/403), it does not serve the
model (404), or it takes requests and never answers them. Asking every
question anyway would only fill the answers file with the same error and
grade the model 0 (or wait ``--timeout`` per question, in silence); so each
endpoint the run needs gets one 1-token chat request first, within the
timeout, and the run stops with one line that names the endpoint and the
cause. A question that times out later gets the endpoint the same request
again: no answer to it either stops the run the same way. Anything else
(429, 5xx, a cut response, a slow answer from an endpoint that still answers)
is a question's bad luck: it is recorded and retried on the next run, except
a refusal of the question itself (``cannot_take``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping

from tokenmill.client.http_errors import ConnectError, TransportError
from tokenmill.client.http_transport import HTTPTransport
from tokenmill.client.wire import status_error
from tokenmill.protocol.errors import APIError

CHECK_MESSAGES = [{"role": "user", "content": "Reply OK."}]
# What a server answers, every time, to a request it will not take: 400 (a prompt longer than its
# context, a value out of its range), 413 (too large), 422 (fields it cannot process). 401, 403 and
# 404 are the endpoint's (no question gets through); 408 and 429 pass.
REFUSED = frozenset({400, 413, 422})


class EndpointUnusable(Exception):
    """An endpoint no question can get an answer from; the message names it and the cause."""


async def check_endpoints(
    endpoints: Mapping[str, str],
    model: str | None,
    api_key: str | None,
    timeout_s: float = 300.0,
    temperature: float = 0.0,
) -> None:
    """Raise ``EndpointUnusable`` for the first endpoint (in the order given) that cannot be used;
    one that gives no answer to a 1-token request within ``timeout_s`` cannot, nor one that refuses
    it (400, 413, 422) with the run's ``temperature``: every question would be refused alike."""
    checks = (_check(name, url, model, api_key, timeout_s, temperature) for name, url in endpoints.items())
    found = await asyncio.gather(*checks)
    for problem in found:
        if problem is not None:
            raise problem


def cannot_take(error: BaseException) -> bool:
    """The endpoint refused the request itself: asking again gets the same refusal."""
    return isinstance(error, APIError) and error.status in REFUSED


async def endpoint_problem(
    name: str,
    url: str,
    error: BaseException,
    model: str | None,
    api_key: str | None,
    timeout_s: float = 300.0,
) -> EndpointUnusable | None:
    """The endpoint-wide cause behind a failed request, or None if the failure is the request's own."""
    where = f"--endpoint {name}={url}"
    if isinstance(error, ConnectError):
        return EndpointUnusable(f"{where} cannot be reached: {_connect_reason(error, url)}")
    if isinstance(error, TimeoutError):
        # A long answer may take longer than a short one: the endpoint is stuck only if it cannot
        # give even one token in that time.
        return await _check(name, url, model, api_key, timeout_s)
    if not isinstance(error, APIError):
        return None
    if error.status in (401, 403):
        if api_key:
            cause, hint = "the API key sent is wrong", "check --api-key or $TOKENMILL_API_KEY"
        else:
            cause, hint = "no API key was sent", "pass --api-key or set $TOKENMILL_API_KEY"
        return EndpointUnusable(f"{where} refused the request ({error.status}): {cause}; {hint}")
    if error.status != 404:
        return None
    if model is None:
        # No model was named, so the server chose its own: the 404 is for the path.
        return EndpointUnusable(
            f"{where} has no /v1/chat/completions (404: {error.message}): "
            "allowed the base URL of an OpenAI-compatible server, http://host:port"
        )
    served = await served_models(url, api_key)
    listing = f"it serves {', '.join(map(repr, served))}" if served else f"the server says: {error.message}"
    return EndpointUnusable(f"{where} does not serve --model {model!r} (404): {listing}")


async def served_models(url: str, api_key: str | None) -> list[str]:
    """The model ids of GET /v1/models; empty if the server does not list them."""
    try:
        async with _transport(url, api_key) as http:
            response = await http.request("GET", "/v1/models")
        data = response.json().get("data") if response.status == 200 else None
        return [str(m["id"]) for m in data or () if isinstance(m, dict) and "id" in m]
    except (TransportError, ValueError, AttributeError):
        return []


async def _check(
    name: str, url: str, model: str | None, api_key: str | None, timeout_s: float, temperature: float = 0.0
) -> EndpointUnusable | None:
    body: dict[str, object] = {"messages": CHECK_MESSAGES, "max_tokens": 1, "temperature": temperature}
    if model is not None:
        body["model"] = model
    try:
        async with asyncio.timeout(timeout_s), _transport(url, api_key, timeout_s) as http:
            response = await http.request("POST", "/v1/chat/completions", json=body)
    except TimeoutError:  # the transport's ReadTimeout is one too
        return EndpointUnusable(
            f"--endpoint {name}={url} gave no answer to a 1-token request within --timeout {timeout_s:g} s"
        )
    except TransportError as e:
        return await endpoint_problem(name, url, e, model, api_key)
    if response.status < 400:
        return None
    error = status_error(response.status, response.content, response.headers)
    if cannot_take(error):
        return EndpointUnusable(
            f"--endpoint {name}={url} refused a 1-token request with the run's settings "
            f"({error.status}): {error.message}"
        )
    return await endpoint_problem(name, url, error, model, api_key)


def _connect_reason(error: ConnectError, url: str) -> str:
    # asyncio words a refused connection "Connect call failed ('127.0.0.1', 19999)"; the OS error
    # underneath (kept as the context) says it plainly. Name lookups have no errno of the OS.
    cause = error.__context__
    if isinstance(cause, OSError) and cause.errno is not None and cause.errno > 0:
        return os.strerror(cause.errno).lower()
    return str(error).removeprefix(f"cannot connect to {_base(url)}: ")


def _transport(url: str, api_key: str | None, timeout_s: float = 60.0) -> HTTPTransport:
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    return HTTPTransport(_base(url), headers=headers, max_connections=2, read_timeout=timeout_s)


def _base(url: str) -> str:
    """The URL the client sends to (as AsyncClient does: without a trailing /v1)."""
    url = url.rstrip("/")
    return url.removesuffix("/v1")
