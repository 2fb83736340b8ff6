"""``POST /admin/workers``: add, drain or remove a worker while the router runs.

The order is ``{"url": ..., "action": "add" | "drain" | "remove"}``; anything
else in it, or any query parameter, is refused with a 400 naming the field, as
every admin endpoint does: a misspelt field would otherwise be silently ignored
(``"acton": "drain"`` would add the worker it meant to drain).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

from starlette.types import Receive, Send

from tokenmill.protocol.shown import shown
from tokenmill.router.asgi import json_object, read_body, send_error, send_json
from tokenmill.router.policies import Router
from tokenmill.router.workers import WorkerPool

USAGE = 'POST /admin/workers takes {"url": ..., "action": "add" | "drain" | "remove"}'
FIELDS = ("url", "action")
ACTIONS = ("add", "drain", "remove")


async def serve_workers_admin(
    pool: WorkerPool,
    router: Router,
    query: bytes,
    receive: Receive,
    send: Send,
    status: Callable[[], dict[str, Any]],
) -> None:
    """Carry out one order; the answer is the fleet's ``status()`` after it, or a 400 naming the field."""
    body = await read_body(receive)  # (read whatever the answer: the connection stays usable)
    if query:  # the order is the body's: ?url= or ?action= was a mistake, not to be ignored
        name = next(iter(parse_qs(query.decode("latin-1"), keep_blank_values=True)), "")
        why = (
            f"{name} goes in the JSON body, not the query"
            if name in FIELDS
            else f"it takes no query parameters, got {shown(name)}"
        )
        await send_error(send, 400, f"{USAGE}: {why}", param=name[:60] or None)
        return
    try:
        order = json_object(body)
    except ValueError as e:
        await send_error(send, 400, f"{USAGE}: {e}")
        return
    unknown = next((k for k in order if k not in FIELDS), None)
    if unknown is not None:
        why = f"unknown field {unknown!r:.60}; the fields are {', '.join(FIELDS)}"
        await send_error(send, 400, f"{USAGE}: {why}", param=unknown[:60])
        return
    url, action = order.get("url"), order.get("action", "add")
    if not isinstance(url, str) or not url:
        why = f"url is required: the worker's base URL, e.g. http://10.0.0.5:8000, got {shown(url)}"
        await send_error(send, 400, f"{USAGE}: {why}", param="url")
        return
    if action not in ACTIONS:
        why = f"action must be add, drain or remove, got {action!r:.60}"
        await send_error(send, 400, f"{USAGE}: {why}", param="action")
        return
    try:
        if action == "add":
            pool.add(url)
        elif action == "drain":
            pool.drain(url)
        else:
            router.forget(pool.remove(url).url)
    except (ValueError, KeyError) as e:  # a URL that is no worker's, or not one
        await send_error(send, 400, f"{USAGE}: {e.args[0] if e.args else e}", param="url")
        return
    await send_json(send, 200, status())
