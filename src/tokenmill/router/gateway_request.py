"""What the gateway reads from a request and writes into it for the worker: the caller's key, the
priority it runs at, the body as each worker's engine reads it; and the error it answers a request
with itself (``router/gateway.py`` admits)."""

from __future__ import annotations

import json
import time
from typing import Any

from tokenmill.protocol.errors import APIError
from tokenmill.protocol.headers import PRIORITY_HEADER, PRIORITY_MAX, PRIORITY_MIN, parse_priority
from tokenmill.protocol.shown import shown
from tokenmill.protocol.text import utf8_encodable
from tokenmill.router.api_keys import KeyRecord
from tokenmill.router.gateway_config import Price, Team


class GatewayError(Exception):
    """A request the gateway answers itself, with OpenAI's error body."""

    def __init__(
        self, status: int, message: str, kind: str, param: str | None = None, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.retry_after = (
            status,
            message,
            kind,
            param,
            retry_after,
        )


def refusal_reason(error: GatewayError) -> str:
    """Why the gateway refused a request of a team, as its metrics count it: the limit a 429
    names (requests_per_minute, tokens_per_minute, max_parallel, budget), ``model`` for one the
    team may not use (403), ``invalid_request`` for what no worker would take (400)."""
    if error.status == 429:
        return error.param or "limit"
    return "model" if error.status == 403 else "invalid_request"


def api_key(headers: dict[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return headers.get("x-api-key") or None


def model_for(request: dict[str, Any], team: Team) -> str:
    """The request's model, one ``team`` may use (400 or 403 naming ``model`` if not)."""
    model = request.get("model")
    if model is None or model == "":
        raise GatewayError(
            400,
            "model is required: the name of a model your team may use",
            "invalid_request_error",
            "model",
        )
    if not isinstance(model, str):
        raise GatewayError(
            400,
            f"model must be a string, the name of a model your team may use; got {shown(model)}",
            "invalid_request_error",
            "model",
        )
    if not utf8_encodable(model):
        raise GatewayError(
            400,
            "model must be text a UTF-8 store can hold: it has an unpaired \\uD800-\\uDFFF escape",
            "invalid_request_error",
            "model",
        )
    if not team.allows(model):
        allowed = ", ".join(team.models)
        raise GatewayError(
            403,
            f"team {team.name} may not use model {model!r}; it may use: {allowed}",
            "permission_error",
            "model",
        )
    return model


def check_priced(model: str, team: Team, price: Price | None, prices: dict[str, Price]) -> None:
    """A team with a dollar budget may use only models with a price (``price``: the model's, or the
    ``"*"`` one): what it spent on any other could not be counted against its budget, which would
    then not hold. 403 naming ``model`` otherwise."""
    b = team.budget
    if price is None and b is not None and b.dollars is not None:
        usable = ", ".join(m for m in prices if team.allows(m)) or "none"
        raise GatewayError(
            403,
            f"model {model!r} has no price in the gateway config, so team {team.name}'s dollar budget "
            f"could not be kept: use a model with a price (of yours: {usable}), or ask an operator "
            f'to add prices.{model} (or a "*" price) to the gateway config',
            "permission_error",
            "model",
        )


def priority_for(request: dict[str, Any], headers: dict[str, str], team: Team) -> int:
    """The team's class, or lower if the request asks; never higher."""
    asked: Any = request.get("priority")
    if asked is None and PRIORITY_HEADER in headers:
        try:
            asked = parse_priority(headers[PRIORITY_HEADER])  # as workers read it
        except APIError as e:
            raise GatewayError(400, e.message, "invalid_request_error", "priority") from None
    if asked is None:
        return team.priority
    if not isinstance(asked, int) or isinstance(asked, bool) or not PRIORITY_MIN <= asked <= PRIORITY_MAX:
        raise GatewayError(
            400,
            f"priority must be an integer from {PRIORITY_MIN} to {PRIORITY_MAX}, got {shown(asked)}",
            "invalid_request_error",
            "priority",
        )
    return min(asked, team.priority)


def with_priority(body: bytes, priority: int) -> bytes | None:
    """``body`` with ``"priority"`` added as its last field, without re-encoding the rest; None if
    it does not end like a JSON object with fields."""
    end = body.rstrip()
    if not end.endswith(b"}") or end[:-1].rstrip().endswith(b"{") or b"\x00" in body[:4]:
        return None  # (a NUL among the first bytes: UTF-16 or UTF-32, which json.loads reads too)
    return b'%s, "priority": %d}' % (end[:-1], priority)


def body_for(engine: str | None, request: dict[str, Any], body: bytes) -> bytes:
    """The gateway's body as a worker's engine reads it: vLLM runs the lowest priority value first
    (with ``--scheduling-policy priority``), tokenmill the highest."""
    if engine != "vllm" or not isinstance(request.get("priority"), int):
        return body
    return json.dumps({**request, "priority": -request["priority"]}).encode()


def rotation_refusal(key_id: str, old: KeyRecord | None, teams: dict[str, Team]) -> GatewayError | None:
    """Why the key ``key_id`` (``old``, its record) cannot be rotated: no such key (404), one
    rotated, revoked or expired already, or of a team that no longer exists (409); None if it can."""
    if old is None:
        return GatewayError(404, f"no key {key_id!r}", "not_found_error")
    if old.revoked is not None or not old.active():
        revoked = old.revoked is not None
        what, at = ("rotated or revoked", old.revoked) if revoked else ("expired", old.expires)
        assert at is not None
        return GatewayError(
            409,
            f"key {key_id} was {what} already: it {'stops' if old.active() else 'stopped'} working at "
            f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(at))}",
            "invalid_request_error",
        )
    if old.team not in teams:
        return GatewayError(
            409,
            f"key {key_id}'s team {old.team} no longer exists: there is no team to rotate it for",
            "invalid_request_error",
        )
    return None
