"""The gateway's API keys: how they are made, named and stored.

Keys are random (``tm-`` + 43 URL-safe characters, 256 bits) and stored only as
their SHA-256: a key that strong needs no slow hash, and the ledger leaking
gives no key away. A key's id (``key_`` + 12 hex digits) names it in the admin
API and the usage log; the key itself is shown once, when it is made.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

MAX_GRACE_S = 30 * 86400  # how long a rotated key may keep working, at most
MAX_EXPIRES_IN_S = 10 * 365 * 86400  # how far ahead a key may expire, at most


@dataclass(frozen=True)
class KeyRecord:
    id: str
    team: str
    label: str | None
    created: float
    revoked: float | None  # when it stops (stopped) working: ahead of now in a rotation's grace period
    expires: float | None = None  # when it stops working by itself (set at creation; None: never)
    replaced_by: str | None = None  # the id of the key a rotation made in its place

    def active(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return (self.revoked is None or self.revoked > now) and (self.expires is None or self.expires > now)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "team": self.team, "label": self.label, "created": self.created,
                "revoked": self.revoked, "expires": self.expires, "replaced_by": self.replaced_by,
                "active": self.active()}  # fmt: skip


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "tm-" + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return "key_" + secrets.token_hex(6)
