"""The ledger's teams and API keys (as hashes): what an operator changes, beside the usage log.

``Ledger`` (``router/ledger.py``) has these methods; they are here so that each file keeps one job.
Keys are stored only as their hashes (``router/api_keys.py``).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time

from tokenmill.router.api_keys import KeyRecord, hash_key, new_key, new_key_id
from tokenmill.router.gateway_config import GatewayConfigError, Team, parse_team

TEAMS_SCHEMA = """
CREATE TABLE IF NOT EXISTS teams (name TEXT PRIMARY KEY, config TEXT NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY, team TEXT NOT NULL, hash TEXT NOT NULL UNIQUE, label TEXT,
    created REAL NOT NULL, revoked REAL
);
"""


class TeamsAndKeys:
    """The teams and keys tables, for ``Ledger`` (which opens ``_db`` and gives ``_transaction``)."""

    _db: sqlite3.Connection

    def _transaction(self) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError  # Ledger's

    # -- teams -------------------------------------------------------------------------------

    def save_team(self, team: Team) -> None:
        self._db.execute(
            "INSERT INTO teams (name, config, updated) VALUES (?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET config = excluded.config, updated = excluded.updated",
            (team.name, json.dumps(team.to_dict()), time.time()),
        )

    def delete_team(self, name: str) -> bool:
        with self._transaction():
            gone = self._db.execute("DELETE FROM teams WHERE name = ?", (name,)).rowcount > 0
            self._db.execute(
                "UPDATE keys SET revoked = ? WHERE team = ? AND revoked IS NULL", (time.time(), name)
            )
        return gone

    def teams(self) -> dict[str, Team]:
        out = {}
        for name, config in self._db.execute("SELECT name, config FROM teams"):
            data = json.loads(config)
            data.pop("name", None)
            try:
                out[name] = parse_team(name, data)
            except GatewayConfigError:  # written by a newer version: skip rather than fail to start
                continue
        return out

    # -- keys --------------------------------------------------------------------------------

    def create_key(self, team: str, label: str | None = None) -> tuple[str, KeyRecord]:
        """A new key for ``team``: the key itself (shown once, never stored) and its record."""
        key = new_key()
        record = KeyRecord(new_key_id(), team, label, time.time(), None)
        self._db.execute(
            "INSERT INTO keys (id, team, hash, label, created) VALUES (?, ?, ?, ?, ?)",
            (record.id, team, hash_key(key), label, record.created),
        )
        return key, record

    def revoke_key(self, key_id: str) -> KeyRecord | None:
        self._db.execute(
            "UPDATE keys SET revoked = ? WHERE id = ? AND revoked IS NULL", (time.time(), key_id)
        )
        return self.key(key_id)

    def key(self, key_id: str) -> KeyRecord | None:
        row = self._db.execute("SELECT id, team, label, created, revoked FROM keys WHERE id = ?", (key_id,))
        found = row.fetchone()
        return KeyRecord(*found) if found else None

    def keys(self, team: str | None = None) -> list[KeyRecord]:
        query = "SELECT id, team, label, created, revoked FROM keys"
        rows = self._db.execute(query + " WHERE team = ?", (team,)) if team else self._db.execute(query)
        return [KeyRecord(*row) for row in rows]

    def active_key_hashes(self) -> dict[str, tuple[str, str]]:
        """hash -> (key id, team) of every key not revoked."""
        rows = self._db.execute("SELECT hash, id, team FROM keys WHERE revoked IS NULL")
        return {h: (key_id, team) for h, key_id, team in rows}
