"""One turn's usage writes, gathered in memory and written to the ledger in one transaction.

A request through the gateway opens a usage row before it is forwarded and
closes it when it ends. Written one statement at a time, that is an insert, an
update and an upsert of the day's totals per request, each a round trip into
SQLite. Gathered over a turn of the event loop they become one ``executemany``
per kind, with the totals summed in Python first (one upsert per team, day and
model, not per request), and a row opened and closed in the same turn is
inserted once, closed.

Row ids are given when the batch is written, inside its write transaction
(``MAX(id) + 1`` onward, under SQLite's write lock, so another writer of the same
file cannot take them); until then a ``UsageRow`` is the handle to close.
"""

from __future__ import annotations

import functools
import sqlite3
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

_INSERT = (
    "INSERT INTO usage (id, request_id, team, key_id, model, priority, prompt_tokens, started, tags, "
    "status, completion_tokens, http_status, worker, latency_s, cost, finished) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_UPDATE = (
    "UPDATE usage SET prompt_tokens = ?, completion_tokens = ?, status = ?, http_status = ?, worker = ?, "
    "latency_s = ?, cost = ?, finished = ? WHERE id = ?"
)
# A running request's checkpoint: its completion so far, and its worker if the row was written
# before the worker was chosen (a request that waited in the admission queue).
_PROGRESS = "UPDATE usage SET completion_tokens = ?, worker = COALESCE(?, worker) WHERE id = ?"
_ADD_TOTALS = (
    "INSERT INTO totals VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (team, day, model) DO UPDATE SET "
    "requests = requests + excluded.requests, prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
    "completion_tokens = completion_tokens + excluded.completion_tokens, cost = cost + excluded.cost"
)


@dataclass(frozen=True, slots=True)
class Closing:
    """How a request ended, for its usage row."""

    prompt_tokens: int
    completion_tokens: int
    status: str  # ok, error, cancelled, interrupted, ...
    http_status: int | None
    worker: str | None
    latency_s: float
    cost: float


@dataclass(slots=True, eq=False)
class UsageRow:
    """A request's row in the usage log; ``id`` is set once the row is written."""

    request_id: str
    team: str
    key_id: str
    model: str
    priority: int
    prompt_tokens: int
    started: float  # time.time()
    tags: str | None  # JSON
    id: int | None = None
    day: str = field(init=False)
    closed: tuple[Any, ...] | None = None  # status .. finished, when closed before it was written
    # The worker that has the request, once chosen (``call.Outcome`` sets it): written with the row
    # if known by then, else with its next checkpoint, so that a row a dead gateway left in flight
    # names its worker. ``worker_written``: the one its row on disk (or the batch) holds.
    worker: str | None = None
    worker_written: str | None = None

    def __post_init__(self) -> None:
        self.day = day_of(self.started)


@dataclass
class UsageBatch:
    opened: list[UsageRow] = field(default_factory=list)
    progressed: list[tuple[int, str | None, int]] = field(default_factory=list)  # _PROGRESS's parameters
    closed: list[tuple[Any, ...]] = field(default_factory=list)  # _UPDATE's parameters
    totals: dict[tuple[str, str, str], list[Any]] = field(default_factory=dict)  # requests, tokens, cost

    def __bool__(self) -> bool:
        return bool(self.opened or self.progressed or self.closed or self.totals)

    def open(self, row: UsageRow) -> None:
        self.opened.append(row)

    def close(self, row: UsageRow, c: Closing, finished: float) -> None:
        values = (c.status, c.completion_tokens, c.http_status, c.worker, c.latency_s, c.cost, finished)
        if row.id is None:  # opened this turn: inserted once, already closed
            row.prompt_tokens = c.prompt_tokens
            row.closed = values
        else:
            self.closed.append(
                (c.prompt_tokens, c.completion_tokens, c.status, c.http_status, c.worker, c.latency_s, c.cost,
                 finished, row.id)
            )  # fmt: skip
        self.add_totals(row.team, row.day, row.model, c.prompt_tokens, c.completion_tokens, c.cost)

    def progress(self, row: UsageRow, completion_tokens: int) -> None:
        """A row written and still open: its completion so far and its worker (written before any
        closing)."""
        assert row.id is not None
        self.progressed.append((completion_tokens, row.worker, row.id))
        row.worker_written = row.worker

    def add_totals(self, team: str, day: str, model: str, prompt: int, completion: int, cost: float) -> None:
        t = self.totals.get((team, day, model))
        if t is None:
            self.totals[(team, day, model)] = [1, prompt, completion, cost]
        else:
            t[0] += 1
            t[1] += prompt
            t[2] += completion
            t[3] += cost

    def spent(self, team: str, since_day: str) -> tuple[int, float]:
        """Tokens and dollars of ``team`` from ``since_day`` on that are not written yet."""
        tokens, dollars = 0, 0.0
        for (t, day, _), (_, prompt, completion, cost) in self.totals.items():
            if t == team and day >= since_day:
                tokens += prompt + completion
                dollars += cost
        return tokens, dollars

    def write(self, db: sqlite3.Connection) -> int:
        """Everything gathered, inside the caller's write transaction (``BEGIN IMMEDIATE``); returns
        the id of the first row opened, for ``written``."""
        first = 0
        if self.opened:
            first = db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM usage").fetchone()[0]
            db.executemany(
                _INSERT,
                [
                    (first + i, row.request_id, row.team, row.key_id, row.model, row.priority,
                     row.prompt_tokens, row.started, row.tags,
                     *(row.closed or ("in_flight", 0, None, row.worker, None, 0.0, None)))
                    for i, row in enumerate(self.opened)
                ],
            )  # fmt: skip
        if self.progressed:
            db.executemany(_PROGRESS, self.progressed)
        if self.closed:  # after the checkpoints: a closing has the last word
            db.executemany(_UPDATE, self.closed)
        if self.totals:
            db.executemany(_ADD_TOTALS, [(*key, *t) for key, t in self.totals.items()])
        return first

    def written(self, first: int) -> None:
        """``write``'s transaction committed: the rows take their ids, and the batch starts again.
        (Until then, a failed commit leaves everything here for the next one.)"""
        for i, row in enumerate(self.opened):
            row.id = first + i
            row.worker_written = row.worker
        self.opened, self.progressed, self.closed, self.totals = [], [], [], {}


def day_of(timestamp: float) -> str:
    """The UTC day of a time.time() stamp, as the totals name it."""
    return _day(int(timestamp // 86400))


@functools.lru_cache(maxsize=8)
def _day(days_since_epoch: int) -> str:  # every request asks; the answer changes once a day
    return datetime.fromtimestamp(days_since_epoch * 86400, UTC).date().isoformat()
