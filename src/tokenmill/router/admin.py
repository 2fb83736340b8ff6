"""The gateway's own endpoints: teams and keys (admin key), and each team's usage.

- ``GET /admin/teams``; ``POST /admin/teams`` with a team's fields and ``name``
  (creates or replaces it); ``DELETE /admin/teams/{name}`` (its keys are revoked).
- ``GET /admin/keys[?team=T]``; ``POST /admin/keys`` with ``{"team": T, "label": ...}``
  returns the new key, the only time it is shown; ``POST /admin/keys/{id}/revoke``;
  ``POST /admin/keys/{id}/rotate`` (a new key, the old one revoked).
- ``GET /v1/usage?from=YYYY-MM-DD&to=YYYY-MM-DD&group_by=model|day``: totals for
  the caller's team; with the admin key, every team (``team=T`` narrows).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date
from typing import Any
from urllib.parse import parse_qs

from starlette.types import Receive, Scope, Send

from tokenmill.router.asgi import forwarded_headers, read_body, send_error, send_json
from tokenmill.router.gateway import Gateway, GatewayError
from tokenmill.router.gateway_config import GatewayConfigError, parse_team


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]


def handle_admin(
    gateway: Gateway, method: str, path: str, query: str, body: bytes, headers: dict[str, str]
) -> Answer:
    if not gateway.is_admin(headers):
        raise GatewayError(
            401, "the admin key is required (Authorization: Bearer ...)", "authentication_error"
        )
    parts = [p for p in path.split("/") if p][1:]  # after "admin"
    data = _json(body) if method == "POST" else {}
    if parts == ["teams"] and method == "GET":
        return Answer(200, {"teams": [t.to_dict() for t in gateway.teams.values()]})
    if parts == ["teams"] and method == "POST":
        name = data.pop("name", None)
        try:
            team = parse_team(name, data)
        except GatewayConfigError as e:
            raise GatewayError(400, str(e), "invalid_request_error") from None
        gateway.set_team(team)
        return Answer(200, team.to_dict())
    if len(parts) == 2 and parts[0] == "teams" and method == "DELETE":
        if not gateway.delete_team(parts[1]):
            raise GatewayError(404, f"no team {parts[1]!r}", "not_found_error")
        return Answer(200, {"deleted": parts[1]})
    if parts == ["keys"] and method == "GET":
        team = parse_qs(query).get("team", [None])[0]
        return Answer(200, {"keys": [k.to_dict() for k in gateway.ledger.keys(team)]})
    if parts == ["keys"] and method == "POST":
        team, label = data.get("team"), data.get("label")
        if not isinstance(team, str) or team not in gateway.teams:
            known = ", ".join(sorted(gateway.teams)) or "none yet"
            raise GatewayError(
                400,
                f"team must name an existing team ({known}), got {team!r}",
                "invalid_request_error",
                "team",
            )
        if label is not None and not isinstance(label, str):
            raise GatewayError(400, "label must be a string", "invalid_request_error", "label")
        key, record = gateway.create_key(team, label)
        return Answer(200, {**record.to_dict(), "key": key})
    if len(parts) == 3 and parts[0] == "keys" and method == "POST" and parts[2] in ("revoke", "rotate"):
        if parts[2] == "revoke":
            record = gateway.revoke_key(parts[1])
            if record is None:
                raise GatewayError(404, f"no key {parts[1]!r}", "not_found_error")
            return Answer(200, record.to_dict())
        rotated = gateway.rotate_key(parts[1])
        if rotated is None:
            raise GatewayError(404, f"no active key {parts[1]!r}", "not_found_error")
        key, record = rotated
        return Answer(200, {**record.to_dict(), "key": key, "replaces": parts[1]})
    raise GatewayError(404, f"no route {method} {path}", "not_found_error")


def handle_usage(gateway: Gateway, query: str, headers: dict[str, str]) -> Answer:
    args = {k: v[0] for k, v in parse_qs(query).items()}
    if gateway.is_admin(headers):
        team = args.get("team")
    else:
        who = gateway.caller(headers)
        if who is None:
            raise GatewayError(
                401, "a valid API key is required (Authorization: Bearer ...)", "authentication_error"
            )
        team = who[1]  # a team sees its own usage only, whatever it asks
    group_by = args.get("group_by", "model")
    if group_by not in ("model", "day"):
        raise GatewayError(
            400, f"group_by must be model or day, got {group_by!r}", "invalid_request_error", "group_by"
        )
    start, end = _day(args.get("from"), "from"), _day(args.get("to"), "to")
    rows = gateway.ledger.usage(team, start, end, group_by)
    return Answer(200, {"object": "list", "group_by": group_by, "data": rows})


async def serve_gateway_api(gateway: Gateway, scope: Scope, receive: Receive, send: Send) -> None:
    """The endpoints above, answered over ASGI (errors in OpenAI's shape)."""
    headers = forwarded_headers(scope["headers"])
    query = scope.get("query_string", b"").decode("latin-1")
    try:
        if scope["path"] == "/v1/usage":
            if scope["method"] != "GET":
                raise GatewayError(405, "/v1/usage takes GET", "invalid_request_error")
            answer = handle_usage(gateway, query, headers)
        else:
            body = await read_body(receive)
            answer = handle_admin(gateway, scope["method"], scope["path"], query, body, headers)
    except GatewayError as e:
        await send_error(send, e.status, e.message, kind=e.kind, retry_after=e.retry_after, param=e.param)
        return
    await send_json(send, answer.status, answer.body)


def _day(value: str | None, field: str) -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise GatewayError(
            400, f"{field} must be a date, YYYY-MM-DD, got {value!r}", "invalid_request_error", field
        ) from None


def _json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body or b"{}")
    except ValueError as e:
        raise GatewayError(400, f"the body is not valid JSON: {e}", "invalid_request_error") from None
    if not isinstance(data, dict):
        raise GatewayError(400, "the body must be a JSON object", "invalid_request_error")
    return data
