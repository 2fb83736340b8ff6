"""The gateway's ledger: teams, API keys (as hashes) and one usage row per request, in SQLite.

SQLite in WAL mode with ``synchronous=NORMAL``: a commit survives the gateway
process dying (not the machine losing power mid-write). A request's row is
written as it is forwarded, status ``in_flight``, and completed when it
ends; while a stream runs, its row is brought up to date with the completion
tokens sent so far every few seconds (``progress``). Rows still ``in_flight``
when a gateway starts belong to one that died with them, and are closed as
``interrupted``: their prompt tokens and the completion tokens of their last
checkpoint still count against the team's budget, charged at the model's
price. Per team,
day and model, totals are kept beside the log in the same transaction, so
budgets and ``/v1/usage`` read a few dozen rows, never the log.

Group commit: inside an event loop, usage rows opened and closed are gathered
in memory (``router/usage_batch.py``) and written in one transaction: a few
``executemany`` statements and one commit for every request gathered, instead
of three statements and a commit's share each. A commit is made at the end of
the turn of the loop that gathered a write, or, while ``PACED_FROM`` requests
or more are in flight and the last commit is less than ``COMMIT_INTERVAL_S``
old, when that interval is up: under load the commits are paced, each taking
the rows of many turns (a commit's fixed cost is that of three or four rows),
while a quiet gateway commits each request as it is forwarded, so the commit
never waits on its round trip. ``durable()`` asks for the
commit at the end of the turn. The gateway awaits it before the client
receives the first byte of its answer, not before forwarding: the commit then
overlaps the worker's round trip, and a response the client saw any of is
always in the ledger. (Only a gateway killed between forwarding a request and
its next commit, at most ``COMMIT_INTERVAL_S`` later, loses its row; the
client received nothing, and the worker stops when the connection drops. A
closing not yet committed leaves its row in flight, closed as interrupted at
the next start.) Team and key changes, and any write made outside a loop,
commit at once.

The usage log has no index but its ids, and ids are given by the batch (no
AUTOINCREMENT bookkeeping): every page a commit touches is written to the WAL
whole, and these two added a third to each commit's cost. Budgets and
``/v1/usage`` read the totals; only audits read the log, and a scan of it is
fast enough for them. (Ledgers made before keep theirs; both read the same.)

Keys are stored only as their hashes (``router/api_keys.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from tokenmill.router.gateway_config import Budget, Price
from tokenmill.router.ledger_lock import lock_ledger
from tokenmill.router.ledger_teams import TEAMS_SCHEMA, TeamsAndKeys
from tokenmill.router.usage_batch import Closing, UsageBatch, UsageRow, day_of

logger = logging.getLogger(__name__)

COMMIT_INTERVAL_S = 0.002  # under load, commits nobody waits for are at least this far apart
PACED_FROM = 8  # requests in flight (rows opened, not closed) from which commits are paced

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY, request_id TEXT NOT NULL, team TEXT NOT NULL,
    key_id TEXT NOT NULL, model TEXT NOT NULL, worker TEXT, priority INTEGER,
    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL DEFAULT 0,
    latency_s REAL, status TEXT NOT NULL, http_status INTEGER, cost REAL NOT NULL DEFAULT 0,
    started REAL NOT NULL, finished REAL, tags TEXT
);
CREATE TABLE IF NOT EXISTS totals (
    team TEXT NOT NULL, day TEXT NOT NULL, model TEXT NOT NULL, requests INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, cost REAL NOT NULL,
    PRIMARY KEY (team, day, model)
);
"""


class Ledger(TeamsAndKeys):
    def __init__(self, path: Path, price: Callable[[str], Price | None] | None = None) -> None:
        """``price(model)``: the gateway's price of a model, which recovery charges interrupted
        rows' prompts at (no price: they cost nothing)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.price = price
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(TEAMS_SCHEMA + _SCHEMA)
        self._add_columns()
        self._batch = UsageBatch()  # usage writes not committed yet
        self._commit: asyncio.Handle | None = None  # the commit scheduled in the loop, if any
        self._commit_at_once = False  # ... and it is at the end of this turn, not paced
        self._commit_loop: asyncio.AbstractEventLoop | None = None  # ... and the loop it is in
        self._last_commit = -COMMIT_INTERVAL_S  # time.monotonic()
        self._in_flight = 0  # rows this ledger opened and has not closed
        self._waiters: list[asyncio.Future[None]] = []  # durable() callers
        self.recovered = 0  # rows recover_interrupted() closed
        self._lock_fd: int | None = None  # claim()

    def close(self) -> None:
        self.commit()
        self._db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # the claim ends with it
            self._lock_fd = None

    async def durable(self, row: UsageRow | None = None) -> None:
        """Return once ``row`` is written (``open_request``'s handle), or with no row, once every
        usage write made so far is committed."""
        if not self._batch or (row is not None and row.id is not None):
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._schedule_commit(at_once=True)  # (after a failed commit, nothing else may ask for one)
        await waiter

    def commit(self) -> None:
        """Write the usage gathered so far in one transaction, and wake whoever waits for it. On an
        error the waiters get it, and what was gathered stays for the next commit."""
        if self._commit is not None:
            self._commit.cancel()
            self._commit = None
        self._last_commit = time.monotonic()
        waiters, self._waiters = self._waiters, []
        try:
            if self._batch:
                with self._transaction():
                    first = self._batch.write(self._db)
                self._batch.written(first)
        except Exception as e:
            for w in waiters:
                if not w.done():
                    w.set_exception(e)
            if not isinstance(e, sqlite3.Error):
                # A value SQLite cannot take (the gateway checks what it writes, so a bug): kept,
                # it would fail every later commit and stop all accounting, so it is dropped.
                logger.error("dropping %d unwritable usage rows: %r", len(self._batch.opened), e)
                self._batch = UsageBatch()
            raise
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def _scheduled_commit(self) -> None:
        self._commit = None
        try:
            self.commit()
        except Exception:  # waiters got the error; a sqlite3.Error's batch is retried with the next commit
            logger.exception("the ledger could not commit")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """Writes that land together or not at all, committed before this returns."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _schedule_commit(self, at_once: bool = False) -> None:
        """Usage was gathered (or ``at_once``: someone waits for it): commit at the end of this turn
        of the loop, or under load when ``COMMIT_INTERVAL_S`` since the last commit is up; now
        outside a loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.commit()  # no loop (the keys CLI, tests): nothing to group with
            return
        if self._commit is not None:
            if self._commit_loop is loop and (self._commit_at_once or not at_once):
                return
            self._commit.cancel()  # a paced commit brought forward, or one a closed loop left
        self._commit_loop = loop
        wait = (
            self._last_commit + COMMIT_INTERVAL_S - time.monotonic() if self._in_flight >= PACED_FROM else 0
        )
        self._commit_at_once = at_once or wait <= 0
        if self._commit_at_once:
            self._commit = loop.call_soon(self._scheduled_commit)
        else:
            self._commit = loop.call_later(wait, self._scheduled_commit)

    # -- usage -------------------------------------------------------------------------------

    def open_request(
        self,
        request_id: str,
        team: str,
        key_id: str,
        model: str,
        priority: int,
        prompt_tokens: int,
        tags: dict[str, Any] | None = None,
        started: float | None = None,
    ) -> UsageRow:
        """The request's row, written with the turn's others (``durable()`` waits for it); the
        handle to close it with. ``started``: its wall time (now by default)."""
        row = UsageRow(
            request_id,
            team,
            key_id,
            model,
            priority,
            prompt_tokens,
            time.time() if started is None else started,
            json.dumps(tags) if tags else None,
        )
        self._batch.open(row)
        self._in_flight += 1
        self._schedule_commit()
        return row

    def close_request(self, row: UsageRow, closing: Closing) -> None:
        """Complete the row ``open_request`` made, and add it to its team's totals."""
        self._batch.close(row, closing, time.time())
        self._in_flight -= 1
        self._schedule_commit()

    def progress(self, row: UsageRow, completion_tokens: int) -> bool:
        """Record a running request's completion tokens so far, for a crash to charge; False (and
        nothing done) while its row is not written yet: the next checkpoint will be."""
        if row.id is None:
            return False
        self._batch.progress(row, completion_tokens)
        self._schedule_commit()
        return True

    def claim(self) -> None:
        """Make this process the ledger's one gateway, or raise ValueError naming the file if
        another holds it (a lock on ``<ledger>.lock``, let go when the process ends, however it
        ends). A gateway's recovery takes every row in flight for lost, and the usage totals are
        kept by one writer: two gateways on one ledger would count requests twice."""
        self._lock_fd = lock_ledger(self.path)  # held for the life of the process

    def recover_interrupted(self) -> int:
        """Close the rows a dead gateway left in flight as interrupted, their prompts and the
        completion tokens of their last checkpoint counted and charged at the model's price
        (``price``), in the row and its totals alike: a dollar budget must not miss what the
        worker computed. Only the gateway that owns the ledger
        calls this, as it starts: anything else that opens the file (``tokenmill keys``, an
        audit) would take the running gateway's requests for lost ones."""
        recovered = UsageBatch()
        with self._transaction():
            rows = self._db.execute(
                "SELECT id, team, model, started, prompt_tokens, completion_tokens FROM usage "
                "WHERE status = 'in_flight'"
            ).fetchall()
            now = time.time()
            closed = []
            for row_id, team, model, started, prompt, completion in rows:
                price = self.price(model) if self.price is not None else None
                completion = completion or 0  # (NULL in ledgers of older versions)
                cost = price.cost(prompt, completion) if price is not None else 0.0
                closed.append((now, cost, row_id))
                recovered.add_totals(team, day_of(started), model, prompt, completion, cost)
            self._db.executemany(
                "UPDATE usage SET status = 'interrupted', finished = ?, cost = ? WHERE id = ?", closed
            )
            recovered.write(self._db)
        self.recovered += len(rows)
        return len(rows)

    def recent_usage(self, seconds: float, now: float | None = None) -> dict[str, list[tuple[float, int]]]:
        """Per team, each request of the last ``seconds``: (seconds ago, prompt and completion
        tokens). Read from the log's end back (ids follow the start times, give or take a commit),
        so a gateway's start reads a minute of rows, not the log."""
        now = time.time() if now is None else now
        recent: dict[str, list[tuple[float, int]]] = {}
        cursor = self._db.execute(
            "SELECT team, started, prompt_tokens + COALESCE(completion_tokens, 0) FROM usage ORDER BY id DESC"
        )
        for team, started, tokens in cursor:
            age = now - started
            if age > seconds + 10:  # (the slack: rows of one commit may start out of order)
                break
            if age <= seconds:
                recent.setdefault(team, []).append((max(age, 0.0), int(tokens or 0)))
        return recent

    def spent(self, team: str, budget: Budget, now: float | None = None) -> tuple[int, float]:
        """Tokens and dollars the team has spent in the budget's current period."""
        start = period_start(budget.period, now).isoformat()
        row = self._db.execute(
            "SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0), COALESCE(SUM(cost), 0) "
            "FROM totals WHERE team = ? AND day >= ?",
            (team, start),
        ).fetchone()
        tokens, dollars = self._batch.spent(team, start)  # this turn's, not written yet
        return int(row[0]) + tokens, float(row[1]) + dollars

    def usage(
        self, team: str | None, start: date | None, end: date | None, group_by: str
    ) -> list[dict[str, Any]]:
        """Totals per team and model or per team and day, from ``start`` to ``end`` (days, inclusive)."""
        key = {"model": "model", "day": "day"}[group_by]
        self.commit()  # this turn's requests too
        where, args = ["1 = 1"], []
        if team is not None:
            where.append("team = ?")
            args.append(team)
        if start is not None:
            where.append("day >= ?")
            args.append(start.isoformat())
        if end is not None:
            where.append("day <= ?")
            args.append(end.isoformat())
        rows = self._db.execute(
            f"SELECT team, {key}, SUM(requests), SUM(prompt_tokens), SUM(completion_tokens), SUM(cost) "
            f"FROM totals WHERE {' AND '.join(where)} GROUP BY team, {key} ORDER BY team, {key}",
            args,
        )
        # The cost to 1e-12 dollars: enough for a single token of the cheapest model (a light user of
        # one saw 0.0 at 1e-6), while the float noise of summing many rows' costs is dropped.
        return [
            {"team": t, group_by: k, "requests": n, "prompt_tokens": p, "completion_tokens": c,
             "total_tokens": p + c, "cost": round(cost, 12)}
            for t, k, n, p, c, cost in rows
        ]  # fmt: skip

    def rows(self, team: str | None = None) -> list[dict[str, Any]]:
        """The raw log (tests and audits)."""
        self.commit()
        cursor = self._db.execute(
            "SELECT * FROM usage" + (" WHERE team = ?" if team else "") + " ORDER BY id",
            (team,) if team else (),
        )
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor]


def period_start(period: str, now: float | None = None) -> date:
    """The first UTC day of the calendar day, week (Monday) or month containing ``now``."""
    today = datetime.fromtimestamp(now if now is not None else time.time(), UTC).date()
    if period == "day":
        return today
    if period == "week":
        return today - timedelta(days=today.weekday())
    return today.replace(day=1)
