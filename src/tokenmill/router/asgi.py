"""Small ASGI pieces the router's front is made of: request headers and body, JSON and error replies."""

from __future__ import annotations

import json
from typing import Any

from starlette.types import Receive, Send

# Headers that describe one connection, not the request: never passed on (content-length is
# set again for the body as it goes out).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


def json_object(body: bytes) -> dict[str, Any]:
    """A request body as a JSON object (empty: ``{}``); ValueError with the 400's message if it
    is not one. Nesting deep enough to exhaust the parser's recursion is refused too: it raises
    RecursionError, which is no ValueError."""
    try:
        data = json.loads(body or b"{}")
    except RecursionError:
        raise ValueError("the body is not valid JSON: it nests too deeply") from None
    except ValueError as e:
        raise ValueError(f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError("the body must be a JSON object")
    return data


def forwarded_headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in raw:
        key = name.decode("latin-1").lower()
        if key not in HOP_BY_HOP:
            headers[key] = value.decode("latin-1")
    return headers


def header(raw: list[tuple[bytes, bytes]], name: str) -> str | None:
    wanted = name.encode()
    for key, value in raw:
        if key.lower() == wanted:
            return value.decode("latin-1")
    return None


async def read_body(receive: Receive) -> bytes:
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(parts)


async def wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def send_json(
    send: Send, status: int, payload: Any, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": body})


async def send_error(
    send: Send,
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    retry_after: int | None = None,
    param: str | None = None,
    code: str | None = None,
) -> None:
    extra = [(b"retry-after", str(retry_after).encode())] if retry_after is not None else []
    await send_json(send, status, error_body(message, kind, param, code), extra)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape, as workers send it."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
