"""The ledger's teams and API keys (as hashes): what an operator changes, beside the usage log.

``Ledger`` (``router/ledger.py``) has these methods; they are here so that each file keeps one job.
Keys are stored only as their hashes (``router/api_keys.py``).

Each team records where it came from (``source``): ``config``, the gateway's YAML file, which is
applied at every start (its teams set from it, and those it no longer names removed), or
``admin``, the admin API (``POST /admin/teams``), kept until deleted there. A team the file names
is the file's from then on; one the API changes keeps its source. Ledgers made before sources
were kept get the column at their next opening, every team ``admin``: kept, as they always were.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterable

from tokenmill.router.api_keys import KeyRecord, hash_key, new_key, new_key_id
from tokenmill.router.gateway_config import GatewayConfigError, Team, parse_team

CONFIG, ADMIN = "config", "admin"  # where a team came from: the gateway's file, or the admin API
SOURCES = (CONFIG, ADMIN)
TEAMS_SCHEMA = """
CREATE TABLE IF NOT EXISTS teams (
    name TEXT PRIMARY KEY, config TEXT NOT NULL, updated REAL NOT NULL, source TEXT NOT NULL DEFAULT 'admin'
);
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY, team TEXT NOT NULL, hash TEXT NOT NULL UNIQUE, label TEXT,
    created REAL NOT NULL, revoked REAL, expires REAL, replaced_by TEXT
);
"""
_KEY_COLUMNS = "id, team, label, created, revoked, expires, replaced_by"  # KeyRecord's fields, in order


class TeamsAndKeys:
    """The teams and keys tables, for ``Ledger`` (which opens ``_db`` and gives ``_transaction``)."""

    _db: sqlite3.Connection
    _transaction: Callable[[], contextlib.AbstractContextManager[None]]  # Ledger's

    def _add_columns(self) -> None:
        """A ledger made before teams had a ``source`` (every team ``admin``), or keys an ``expires``
        (none expires) or a ``replaced_by`` (unknown for keys rotated before): add the column."""
        self._add_column("teams", "source", f"TEXT NOT NULL DEFAULT '{ADMIN}'")
        self._add_column("keys", "expires", "REAL")
        self._add_column("keys", "replaced_by", "TEXT")

    def _add_column(self, table: str, column: str, kind: str) -> None:
        if any(c[1] == column for c in self._db.execute(f"PRAGMA table_info({table})")):
            return
        try:
            self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        except sqlite3.OperationalError as e:  # another process opening it added it first
            if "duplicate column" not in str(e):
                raise

    # -- teams -------------------------------------------------------------------------------

    def save_team(self, team: Team, source: str = "admin") -> None:
        """Set ``team``; ``source``: ``config`` (the gateway's file, which takes the team over) or
        ``admin`` (the admin API: an existing team keeps its source)."""
        if source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
        self._db.execute(
            "INSERT INTO teams (name, config, updated, source) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET config = excluded.config, updated = excluded.updated, "
            f"source = CASE WHEN excluded.source = '{CONFIG}' THEN '{CONFIG}' ELSE teams.source END",
            (team.name, json.dumps(team.to_dict()), time.time(), source),
        )

    def remove_config_teams(self, keep: Iterable[str]) -> list[str]:
        """Delete the teams that came from the gateway's file and are not in ``keep`` (the file's
        teams now), revoking their keys as ``delete_team`` does; their names, sorted."""
        keep = set(keep)
        with self._transaction():
            rows = self._db.execute("SELECT name FROM teams WHERE source = ?", (CONFIG,))
            gone = sorted(name for (name,) in rows if name not in keep)
            now = time.time()
            for name in gone:
                self._db.execute("DELETE FROM teams WHERE name = ?", (name,))
                self._revoke_team_keys(name, now)
        return gone

    def team_sources(self) -> dict[str, str]:
        """Team name -> where it came from: ``config`` or ``admin``."""
        return dict(self._db.execute("SELECT name, source FROM teams"))

    def delete_team(self, name: str) -> bool:
        with self._transaction():
            gone = self._db.execute("DELETE FROM teams WHERE name = ?", (name,)).rowcount > 0
            self._revoke_team_keys(name, time.time())
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

    def create_key(
        self, team: str, label: str | None = None, expires: float | None = None
    ) -> tuple[str, KeyRecord]:
        """A new key for ``team``, working until ``expires`` (a time.time(); None: until revoked):
        the key itself (shown once, never stored) and its record."""
        key = new_key()
        record = KeyRecord(new_key_id(), team, label, time.time(), None, expires)
        self._db.execute(
            "INSERT INTO keys (id, team, hash, label, created, expires) VALUES (?, ?, ?, ?, ?, ?)",
            (record.id, team, hash_key(key), label, record.created, expires),
        )
        return key, record

    def revoke_key(self, key_id: str, at: float | None = None) -> KeyRecord | None:
        """Stop the key working at ``at`` (a time.time(); now by default, later at the end of a
        rotation's grace period). A key already set to stop stops at the earlier of the two."""
        at = time.time() if at is None else at
        self._db.execute(
            "UPDATE keys SET revoked = ? WHERE id = ? AND (revoked IS NULL OR revoked > ?)", (at, key_id, at)
        )
        return self.key(key_id)

    def rotate_key(self, key_id: str, stop_at: float) -> tuple[str, KeyRecord] | None:
        """A new key for the team, label and expiry of ``key_id``, which is set to stop at
        ``stop_at``; in one transaction, so that of two rotations of one key at once (two processes)
        one wins. None if ``key_id`` names no key, or one rotated, revoked or expired already."""
        with self._transaction():
            old = self.key(key_id)
            if old is None or old.revoked is not None or not old.active():
                return None
            key, record = self.create_key(old.team, old.label, old.expires)
            self.revoke_key(key_id, stop_at)
            self._db.execute("UPDATE keys SET replaced_by = ? WHERE id = ?", (record.id, key_id))
        return key, record

    def _revoke_team_keys(self, team: str, now: float) -> None:
        """Every key of a team gone stops now, those in a grace period too."""
        self._db.execute(
            "UPDATE keys SET revoked = ? WHERE team = ? AND (revoked IS NULL OR revoked > ?)",
            (now, team, now),
        )

    def key(self, key_id: str) -> KeyRecord | None:
        row = self._db.execute(f"SELECT {_KEY_COLUMNS} FROM keys WHERE id = ?", (key_id,))
        found = row.fetchone()
        return KeyRecord(*found) if found else None

    def keys(self, team: str | None = None) -> list[KeyRecord]:
        query = f"SELECT {_KEY_COLUMNS} FROM keys"
        rows = self._db.execute(query + " WHERE team = ?", (team,)) if team else self._db.execute(query)
        return [KeyRecord(*row) for row in rows]

    def active_keys(self) -> tuple[dict[str, tuple[str, str]], dict[str, float]]:
        """hash -> (key id, team) of every key that works now: not revoked (or rotated and in its
        grace period: ``revoked`` still ahead), and not expired; and key id -> when it stops
        working, of those that will stop by themselves: at the expiry, or at the end of a
        rotation's grace, whichever is first (one read, so that a key cannot slip between the two)."""
        now = time.time()
        rows = self._db.execute(
            "SELECT hash, id, team, revoked, expires FROM keys WHERE (revoked IS NULL OR revoked > ?) "
            "AND (expires IS NULL OR expires > ?)",
            (now, now),
        )
        hashes, stops = {}, {}
        for h, key_id, team, revoked, expires in rows:
            hashes[h] = (key_id, team)
            if revoked is not None or expires is not None:
                stops[key_id] = min(t for t in (revoked, expires) if t is not None)
        return hashes, stops
