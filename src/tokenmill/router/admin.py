"""The gateway's own endpoints: teams and keys (admin key), and each team's usage.

- ``GET /admin/teams``; ``POST /admin/teams`` with a team's fields and ``name``
  (creates or replaces it); ``DELETE /admin/teams/{name}`` (its keys are revoked;
  a team the config file names returns at the next start, and the answer says so).
- ``GET /admin/keys[?team=T]``; ``POST /admin/keys`` with ``{"team": T, "label": ...,
  "expires_in_s": S}`` (a label: at most 256 characters; without ``expires_in_s``, the key
  works until revoked) returns the new key, the only time it is shown;
  ``POST /admin/keys/{id}/revoke``; ``POST /admin/keys/{id}/rotate`` (a new key, the
  old one revoked; with ``{"grace_s": S}``, the old one works S seconds more, up to
  30 days, so its clients move over without a refused request).
- ``GET /v1/usage?from=YYYY-MM-DD&to=YYYY-MM-DD&group_by=model|day``: totals for
  the caller's team; with the admin key, every team (``team=T`` narrows).

Nothing sent is ignored: an unknown field or query parameter is a 400 naming it
and the allowed ones (a misspelt one would otherwise do nothing, silently), and
a known path asked with another method is a 405 with ``Allow``. Errors are in
OpenAI's shape, with ``param`` naming the field where there is one.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from datetime import date
from typing import Any
from urllib.parse import parse_qs

from starlette.types import Receive, Scope, Send

from tokenmill.protocol.shown import shown
from tokenmill.router.api_keys import MAX_EXPIRES_IN_S, MAX_GRACE_S
from tokenmill.router.asgi import error_body, forwarded_headers, json_object, read_body, send_error, send_json
from tokenmill.router.gateway import Gateway, GatewayError
from tokenmill.router.gateway_config import TEAM_FIELDS, GatewayConfigError, parse_label, parse_team

logger = logging.getLogger(__name__)

GROUP_BY = ("model", "day")
USAGE_PARAMS = ("from", "to", "group_by", "team")
_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
KEY_FIELDS = ("team", "label", "expires_in_s")

# Path parts after /admin ("*": any one part) -> the methods the route takes.
_ROUTES: dict[tuple[str, ...], tuple[str, ...]] = {
    ("teams",): ("GET", "POST"),
    ("teams", "*"): ("DELETE",),
    ("keys",): ("GET", "POST"),
    ("keys", "*", "revoke"): ("POST",),
    ("keys", "*", "rotate"): ("POST",),
}


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]


class MethodNotAllowed(GatewayError):
    """A known path asked with a method it does not take: 405, with ``Allow``."""

    def __init__(self, method: str, path: str, allowed: tuple[str, ...]) -> None:
        super().__init__(405, f"{path} takes {' or '.join(allowed)}, not {method}", "invalid_request_error")
        self.allowed = allowed


def handle_admin(
    gateway: Gateway, method: str, path: str, query: str, body: bytes, headers: dict[str, str]
) -> Answer:
    if not gateway.is_admin(headers):
        raise gateway.admin_refusal(headers)
    parts = [p for p in path.split("/") if p][1:]  # after "admin"
    allowed = _allowed(parts)
    if allowed is None:
        raise GatewayError(404, f"no route {method} {path}", "not_found_error")
    if method not in allowed:
        raise MethodNotAllowed(method, path, allowed)
    in_query = ("team",) if parts == ["keys"] and method == "GET" else ()
    args = _query(query, in_query, _body_fields(method, parts))
    data = _json(body) if method == "POST" else {}
    if parts == ["teams"]:
        return _teams(gateway, data) if method == "POST" else _list_teams(gateway)
    if parts[0] == "teams":
        return _delete_team(gateway, parts[1])
    if parts == ["keys"]:
        if method == "POST":
            return _create_key(gateway, data)
        team = args.get("team")
        if team == "":  # (not "every team": an empty filter is a mistake, as it is for /v1/usage)
            raise GatewayError(
                400, "team must name a team (or be absent: every team)", "invalid_request_error", "team"
            )
        return Answer(200, {"keys": [k.to_dict() for k in gateway.ledger.keys(team)]})
    # Revoke takes no body, rotate only its grace: a field sent is a mistake, not ignored.
    _only(data, set() if parts[2] == "revoke" else {"grace_s"})
    if parts[2] == "revoke":
        record = gateway.revoke_key(parts[1])
        if record is None:
            raise GatewayError(404, f"no key {parts[1]!r}", "not_found_error")
        return Answer(200, record.to_dict())
    grace_s = _seconds(data.get("grace_s", 0), "grace_s", MAX_GRACE_S, "30 days", "the old key keeps working")
    key, record, stops = gateway.rotate_key(parts[1], grace_s)
    return Answer(200, {**record.to_dict(), "key": key, "replaces": parts[1], "replaces_until": stops})


def _seconds(
    value: Any, name: str, most: int, most_words: str, what: str, above: float | None = None
) -> float:
    """A JSON number of seconds from 0 (or above ``above``) to ``most``; else a 400 naming ``name``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (value > above if above is not None else value >= 0)  # (NaN fails both)
        or value > most
    ):
        least = f"above {above:g} and at most" if above is not None else "from 0 to"
        raise GatewayError(
            400,
            f"{name} must be seconds {least} {most} ({most_words}) that {what}, got {shown(value)}",
            "invalid_request_error",
            name,
        )
    return float(value)


def _list_teams(gateway: Gateway) -> Answer:
    return Answer(200, {"teams": [t.to_dict() for t in gateway.teams.values()]})


def _teams(gateway: Gateway, data: dict[str, Any]) -> Answer:
    _only(data, {"name", *TEAM_FIELDS})
    name = data.pop("name", None)
    try:
        team = parse_team(name, data, where="")
    except GatewayConfigError as e:
        raise GatewayError(400, str(e), "invalid_request_error", e.field) from None
    gateway.set_team(team)
    out = team.to_dict()
    if team.name in gateway.config.teams:
        out["note"] = (
            f"team {team.name} is defined in the gateway config file: this change lasts until the "
            "gateway restarts, when the file's definition is set again; change it there to keep it"
        )
    return Answer(200, out)


def _delete_team(gateway: Gateway, name: str) -> Answer:
    if not gateway.delete_team(name):
        raise GatewayError(404, f"no team {name!r}", "not_found_error", "name")
    out: dict[str, Any] = {"deleted": name}
    if name in gateway.config.teams:  # the file wins at every start (gateway_config.py)
        out["in_config"] = True
        out["note"] = (
            f"team {name} is defined in the gateway config file: it returns at the next start "
            "(without its keys, which stay revoked) unless it is removed there"
        )
    return Answer(200, out)


def _create_key(gateway: Gateway, data: dict[str, Any]) -> Answer:
    _only(data, set(KEY_FIELDS))
    team = data.get("team")
    if not isinstance(team, str) or team not in gateway.teams:
        known = ", ".join(sorted(gateway.teams)) or "none yet"
        raise GatewayError(
            400,
            f"team must name an existing team ({known}), got {shown(team, 80)}",
            "invalid_request_error",
            "team",
        )
    try:
        label = parse_label(data.get("label"))
    except GatewayConfigError as e:
        raise GatewayError(400, str(e), "invalid_request_error", e.field) from None
    expires_in_s = data.get("expires_in_s")
    if expires_in_s is not None:  # (absent or null: the key works until revoked)
        expires_in_s = _seconds(
            expires_in_s, "expires_in_s", MAX_EXPIRES_IN_S, "10 years", "the key works", above=0
        )
    key, record = gateway.create_key(team, label, expires_in_s)
    return Answer(200, {**record.to_dict(), "key": key})


def handle_usage(gateway: Gateway, query: str, headers: dict[str, str]) -> Answer:
    args = _query(query, USAGE_PARAMS)
    if gateway.is_admin(headers):
        team = args.get("team")
        if team == "":
            raise GatewayError(
                400, "team must name a team (or be absent: every team)", "invalid_request_error", "team"
            )
    else:
        caller = gateway.team_of(headers)
        if caller is None:
            raise GatewayError(
                401, "a valid API key is required (Authorization: Bearer ...)", "authentication_error"
            )
        team = caller.name  # a team sees its own usage only
        asked = args.get("team")
        if asked is not None and asked != team:
            raise GatewayError(
                403,
                f"a key of team {team} sees team {team}'s usage only; team={shown(asked)} needs the "
                "admin key",
                "permission_error",
                "team",
            )
    group_by = args.get("group_by", "model")
    if group_by not in GROUP_BY:
        raise GatewayError(
            400,
            f"group_by must be {' or '.join(GROUP_BY)}, got {shown(group_by)}",
            "invalid_request_error",
            "group_by",
        )
    start, end = _day(args.get("from"), "from"), _day(args.get("to"), "to")
    if start is not None and end is not None and start > end:
        raise GatewayError(
            400,
            f"from ({start}) is after to ({end}): from must be on or before to (both days count)",
            "invalid_request_error",
            "from",
        )
    rows = gateway.ledger.usage(team, start, end, group_by)
    return Answer(200, {"object": "list", "group_by": group_by, "data": rows})


async def serve_gateway_api(gateway: Gateway, scope: Scope, receive: Receive, send: Send) -> None:
    """The endpoints above, answered over ASGI (errors in OpenAI's shape)."""
    headers = forwarded_headers(scope["headers"])
    query = scope.get("query_string", b"").decode("latin-1")
    method, path = scope["method"], scope["path"]
    try:
        if path == "/v1/usage":
            if method != "GET":
                raise MethodNotAllowed(method, path, ("GET",))
            answer = handle_usage(gateway, query, headers)
        else:
            body = await read_body(receive)
            answer = handle_admin(gateway, method, path, query, body, headers)
    except MethodNotAllowed as e:
        await send_not_allowed(send, e.message, e.allowed)
        return
    except GatewayError as e:
        await send_error(send, e.status, e.message, kind=e.kind, retry_after=e.retry_after, param=e.param)
        return
    except Exception:  # a bug, not the request's fault: still an answer in OpenAI's shape
        logger.exception("the gateway failed on %s %s", method, path)
        await send_error(send, 500, f"the gateway failed on {method} {path}; see its log", "server_error")
        return
    await send_json(send, answer.status, answer.body)


async def send_not_allowed(send: Send, message: str, allowed: tuple[str, ...]) -> None:
    """405 with the methods the path takes, in the message and in ``Allow``."""
    body = error_body(message, "invalid_request_error")
    await send_json(send, 405, body, [(b"allow", ", ".join(allowed).encode())])


def _allowed(parts: list[str]) -> tuple[str, ...] | None:
    for route, methods in _ROUTES.items():
        if len(route) == len(parts) and all(r in ("*", p) for r, p in zip(route, parts, strict=True)):
            return methods
    return None


def _only(data: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise GatewayError(
            400,
            f"the body has unknown fields {unknown}: allowed {sorted(allowed)}",
            "invalid_request_error",
            unknown[0],
        )


def _body_fields(method: str, parts: list[str]) -> tuple[str, ...]:
    """What the admin route's JSON body takes (for the hint when one is sent in the query)."""
    if method != "POST":
        return ()
    if parts == ["teams"]:
        return ("name", *TEAM_FIELDS)
    if parts == ["keys"]:
        return KEY_FIELDS
    return ("grace_s",) if parts[-1] == "rotate" else ()


def _query(query: str, allowed: tuple[str, ...], body_fields: tuple[str, ...] = ()) -> dict[str, str]:
    """The query's parameters, each at most once, none but ``allowed`` (blank values kept, so
    ``group_by=`` is refused rather than read as absent); one of ``body_fields`` is refused with
    where it goes."""
    args = parse_qs(query, keep_blank_values=True)
    unknown = sorted(set(args) - set(allowed))
    if misplaced := [name for name in unknown if name in body_fields]:
        name = misplaced[0]
        raise GatewayError(
            400,
            f"{name} goes in the JSON body, not the query: {{{json.dumps(name)}: ...}}",
            "invalid_request_error",
            name,
        )
    if unknown:
        takes = f"allowed: {', '.join(allowed)}" if allowed else "it takes none"
        raise GatewayError(
            400,
            f"unknown query parameters {unknown}; {takes}",
            "invalid_request_error",
            unknown[0],
        )
    for name, values in args.items():
        if len(values) > 1:
            raise GatewayError(
                400, f"{name} is given {len(values)} times: give it once", "invalid_request_error", name
            )
    return {k: v[0] for k, v in args.items()}


def _day(value: str | None, field: str) -> date | None:
    if value is None:
        return None
    try:
        if not _DAY.fullmatch(value):  # date.fromisoformat also takes 20261202 and 2026-W49
            raise ValueError(value)
        return date.fromisoformat(value)
    except ValueError:
        raise GatewayError(
            400, f"{field} must be a date, YYYY-MM-DD, got {shown(value)}", "invalid_request_error", field
        ) from None


def _json(body: bytes) -> dict[str, Any]:
    try:
        return json_object(body)
    except ValueError as e:
        raise GatewayError(400, str(e), "invalid_request_error") from None
