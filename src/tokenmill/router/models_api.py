"""The router's answers about models: ``GET /v1/models`` (the union of the available workers'
lists; behind the gateway, what the caller's key may use) and the 404 for a model no available
worker serves."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from starlette.types import Scope, Send

from tokenmill.client import HTTPTransport, TransportError
from tokenmill.router.asgi import forwarded_headers, send_error, send_json
from tokenmill.router.workers import Worker, WorkerPool

if TYPE_CHECKING:
    from tokenmill.router.gateway import Gateway

MODEL_FIELDS = ("id", "object", "created", "owned_by", "max_model_len")  # what a team's key sees


async def fleet_models(pool: WorkerPool, transport: Callable[[Worker], HTTPTransport]) -> dict[str, Any]:
    """The available workers' model lists, merged by id (asked live: the entries carry more than
    the ids the health checks keep, such as ``max_model_len``)."""

    async def one(w: Worker) -> list[dict[str, Any]]:
        try:
            response = await transport(w).request("GET", "/v1/models")
            return list(response.json().get("data") or []) if response.status == 200 else []
        except (TransportError, ValueError):
            return []

    seen: dict[str, dict[str, Any]] = {}
    for models in await asyncio.gather(*(one(w) for w in pool.available())):
        for m in models:
            seen.setdefault(str(m.get("id")), m)
    return {"object": "list", "data": list(seen.values())}


async def serve_models(
    pool: WorkerPool,
    transport: Callable[[Worker], HTTPTransport],
    gateway: Gateway | None,
    scope: Scope,
    send: Send,
) -> None:
    """``GET /v1/models``. Behind the gateway: every model for the admin key; for a team's key,
    the models the team may use, with only the fields a client needs (a worker's ``root`` is a path
    on its disk); 401 without a valid key."""
    headers = forwarded_headers(scope["headers"])
    if gateway is None or gateway.is_admin(headers):
        await send_json(send, 200, await fleet_models(pool, transport))
        return
    who = gateway.caller(headers)
    team = gateway.teams.get(who[1]) if who is not None else None
    if team is None:
        await send_error(
            send,
            401,
            "a valid API key is required (Authorization: Bearer ...)",
            kind="authentication_error",
        )
        return
    listing = await fleet_models(pool, transport)
    data = [
        {k: m[k] for k in MODEL_FIELDS if k in m} for m in listing["data"] if team.allows(str(m.get("id")))
    ]
    await send_json(send, 200, {"object": "list", "data": data})


async def send_model_not_found(send: Send, pool: WorkerPool, model: str) -> None:
    """OpenAI's 404 for a model no available worker serves, naming the ones they do."""
    served = ", ".join(map(repr, pool.served_models())) or "none listed"
    message = f"model {model!r:.100} is not served by any available worker: the workers serve {served}"
    await send_error(send, 404, message, param="model", code="model_not_found")
