"""Header (and gRPC metadata) names tokenmill reads and writes, and how their values parse."""

from __future__ import annotations

from tokenmill.protocol.errors import APIError

WORKER_HEADER = "x-tokenmill-worker"  # on every response: which worker served it
PRIORITY_HEADER = "x-tokenmill-priority"  # integer, higher is more important, 0 by default
TENANT_HEADER = "x-tokenmill-tenant"  # the team a request is accounted to (set by the gateway)
SESSION_HEADER = "x-tokenmill-session"  # a conversation's id: the client keeps its requests on one endpoint
REQUEST_ID_HEADER = "x-request-id"
# gRPC trailing metadata of an error, so a client rebuilds the same APIError the HTTP front sends
ERROR_PARAM_METADATA = "x-tokenmill-error-param"
ERROR_TYPE_METADATA = "x-tokenmill-error-type"
ERROR_CODE_METADATA = "x-tokenmill-error-code"


PRIORITY_MIN, PRIORITY_MAX = -(2**31), 2**31 - 1  # what gRPC's int32 and the gateway's ledger hold


def parse_priority(value: str | None, field: str = PRIORITY_HEADER) -> int | None:
    """The integer in a priority header or metadata value; None when absent. Digits with an
    optional sign only (not Python's ``int()``, which also reads ``1_0`` and full-width digits)."""
    if value is None or value == "":
        return None
    text = value.strip()
    digits = text[1:] if text[:1] in ("+", "-") else text
    ok = digits.isascii() and digits.isdigit() and len(digits) <= 10  # (int() refuses 4,300 digits and up)
    if ok and PRIORITY_MIN <= (number := int(text)) <= PRIORITY_MAX:
        return number
    raise APIError.invalid_request(
        f"{field}={value!r} is invalid: allowed an integer from {PRIORITY_MIN} to {PRIORITY_MAX} "
        "(higher is more important)",
        param=field,
    )
