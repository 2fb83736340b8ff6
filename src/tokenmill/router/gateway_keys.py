"""Who is asking the gateway, and its keys' administration: a request's key and team (the keys
that work, read from the ledger and re-read every ``KEYS_REFRESH_S``, each stopping at its expiry or
the end of a rotation's grace to the second), the admin key, and keys made, revoked and rotated."""

from __future__ import annotations

import os
import secrets
import time
from collections import Counter

from tokenmill.router.api_keys import KeyRecord, hash_key
from tokenmill.router.gateway_config import GatewayConfig, Team
from tokenmill.router.gateway_request import GatewayError, api_key, rotation_refusal
from tokenmill.router.ledger import Ledger

KEYS_REFRESH_S = 2.0  # keys created or revoked by another process (the CLI) take effect this fast
_SEEN_KEYS_MAX = 10_000


class GatewayKeys:
    """The key side of ``Gateway``, which gives ``config``, ``ledger``, ``teams`` and ``refused``."""

    config: GatewayConfig
    ledger: Ledger
    teams: dict[str, Team]
    refused: Counter[tuple[str, str]]

    def _init_keys(self) -> None:
        self._keys: dict[str, tuple[str, str]] = {}  # hash -> (key id, team) of the keys that work
        self._stops: dict[str, float] = {}  # key id -> when it stops working, of those that will
        # Keys seen since the hashes were last read (in memory only), so a client's key is hashed
        # once, not per request; cleared with every read of the hashes, which drops revoked keys.
        self._seen: dict[str, tuple[str, str] | None] = {}
        self._read_keys()
        # Stripped as a request's key is (``api_key``): " k " could never be matched.
        admin = (os.environ.get(self.config.admin_key_env) or "").strip()
        self._admin_hash = hash_key(admin) if admin else None

    def caller(self, headers: dict[str, str]) -> tuple[str, str] | None:
        """(key id, team) of the request's key; None without a valid one."""
        key = api_key(headers)
        if not key:
            return None
        if time.monotonic() - self._keys_read > KEYS_REFRESH_S:  # `tokenmill keys` may have changed them
            self._read_keys()
        try:
            who = self._seen[key]
        except KeyError:
            who = self._keys.get(hash_key(key))
            if len(self._seen) < _SEEN_KEYS_MAX:  # (a flood of made-up keys only ever misses)
                self._seen[key] = who
        # A key that expires, or ends a rotation's grace, stops then, not at the next read of the keys.
        if who is not None and self._stops:
            stops = self._stops.get(who[0])
            if stops is not None and time.time() >= stops:
                return None
        return who

    def _read_keys(self) -> None:
        self._keys, self._stops = self.ledger.active_keys()
        self._seen = {}
        self._keys_read = time.monotonic()

    @property
    def is_configured_admin(self) -> bool:
        return self._admin_hash is not None

    def is_admin(self, headers: dict[str, str]) -> bool:
        key = api_key(headers)
        return (
            bool(key)
            and self._admin_hash is not None
            and secrets.compare_digest(hash_key(key), self._admin_hash)
        )

    def admin_refusal(self, headers: dict[str, str]) -> GatewayError:
        """The answer to a request without the admin key on an admin route: 403 for a team's key
        (valid, but not for this), 401 for none or an unknown one."""
        if self._admin_hash is None:
            return GatewayError(
                403,
                f"the admin API is off on this gateway: it is on when ${self.config.admin_key_env} "
                "holds the admin key as the gateway starts",
                "permission_error",
            )
        team = self.team_of(headers)
        if team is not None:
            return GatewayError(
                403,
                f"a key of team {team.name} cannot use this route: it needs the admin key",
                "permission_error",
            )
        return GatewayError(
            401, "the admin key is required (Authorization: Bearer ...)", "authentication_error"
        )

    def team_of(self, headers: dict[str, str]) -> Team | None:
        """The team of the request's key; None without a valid key, or for a key whose team was
        deleted (its keys are revoked with it, but one made since by ``tokenmill keys`` is not
        known to this gateway until it restarts)."""
        who = self.caller(headers)
        return self.teams.get(who[1]) if who is not None else None

    def _key_and_team(self, headers: dict[str, str]) -> tuple[str, Team]:
        """The request's key id and team; GatewayError 401 (counted) without a valid key."""
        who = self.caller(headers)
        if who is None:
            self.refused["", "key"] += 1
            raise GatewayError(
                401, "a valid API key is required (Authorization: Bearer ...)", "authentication_error"
            )
        team = self.teams.get(who[1])
        if team is None:
            self.refused["", "key"] += 1
            raise GatewayError(401, f"the key's team {who[1]!r} no longer exists", "authentication_error")
        return who[0], team

    # -- administration of keys -------------------------------------------------------------

    def create_key(
        self, team: str, label: str | None = None, expires_in_s: float | None = None
    ) -> tuple[str, KeyRecord]:
        """A new key for ``team``, working until revoked, or for ``expires_in_s`` from now."""
        if team not in self.teams:
            raise KeyError(team)
        expires = time.time() + expires_in_s if expires_in_s is not None else None
        key, record = self.ledger.create_key(team, label, expires)
        self._keys[hash_key(key)] = (record.id, team)
        if expires is not None:
            self._stops[record.id] = expires
        self._seen.pop(key, None)  # a miss remembered for this very key must not hide it
        return key, record

    def revoke_key(self, key_id: str) -> KeyRecord | None:
        """Stop the key working now (in a rotation's grace period too)."""
        record = self.ledger.revoke_key(key_id)
        self._read_keys()
        return record

    def rotate_key(self, key_id: str, grace_s: float = 0.0) -> tuple[str, KeyRecord, float]:
        """A new key for the same team, label and expiry, and when the old one stops working: now,
        or ``grace_s`` from now (its expiry, if sooner), so that its clients can move to the new one
        without a refused request. GatewayError (404, 409) if ``key_id`` names no key, one rotated,
        revoked or expired already, or one of a team that no longer exists."""
        old = self.ledger.key(key_id)
        refusal = rotation_refusal(key_id, old, self.teams)
        if refusal is not None:
            raise refusal
        assert old is not None  # (rotation_refusal: a 404 otherwise)
        stops = time.time() + grace_s
        if old.expires is not None:
            stops = min(stops, old.expires)  # the grace never outlives the key's expiry
        rotated = self.ledger.rotate_key(key_id, stops)
        if rotated is None:  # rotated by another process between the two looks
            raise GatewayError(409, f"key {key_id} was rotated or revoked already", "invalid_request_error")
        key, record = rotated
        self._read_keys()
        return key, record, stops
