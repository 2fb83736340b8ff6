"""The usage ledger: rows, totals, budgets' spend, recovery of a crashed gateway's requests."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenmill.router import ledger as ledger_module
from tokenmill.router.api_keys import hash_key
from tokenmill.router.gateway_config import Budget, Price, Team
from tokenmill.router.ledger import Ledger
from tokenmill.router.usage_batch import Closing, UsageRow, day_of


def test_rows_and_totals_by_model_and_day(tmp_path: Path):
    ledger = Ledger(tmp_path / "u.db")
    for team, model, prompt, completion in (
        ("a", "m1", 10, 5),
        ("a", "m1", 20, 5),
        ("a", "m2", 1, 1),
        ("b", "m1", 7, 7),
    ):
        row = ledger.open_request("r", team, "k", model, 0, prompt, started=time.time())
        ledger.close_request(row, Closing(prompt, completion, "ok", 200, "w1", 0.1, 0.5))
    by_model = ledger.usage("a", None, None, "model")
    assert [(r["model"], r["requests"], r["prompt_tokens"], r["completion_tokens"]) for r in by_model] == [
        ("m1", 2, 30, 10),
        ("m2", 1, 1, 1),
    ]
    today = date.today()
    assert ledger.usage("a", today, today, "day")[0]["total_tokens"] == 42
    assert ledger.usage("a", date(2000, 1, 1), date(2000, 1, 2), "day") == []
    assert {r["team"] for r in ledger.usage(None, None, None, "model")} == {"a", "b"}
    assert ledger.spent("a", Budget("month", tokens=1)) == (42, 1.5)
    assert [r["status"] for r in ledger.rows("a")] == ["ok"] * 3


def test_requests_in_flight_when_the_gateway_died_are_closed_as_interrupted(tmp_path: Path):
    path = tmp_path / "u.db"
    code = (
        "import os, sys; from pathlib import Path; from tokenmill.router.ledger import Ledger; "
        f"l = Ledger(Path({str(path)!r})); l.open_request('lost', 'a', 'k', 'm', 5, 300); os._exit(9)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 9  # no cleanup at all
    assert Ledger(path).rows("a")[0]["status"] == "in_flight"  # opening the file recovers nothing
    ledger = Ledger(path)
    assert ledger.recover_interrupted() == 1 and ledger.recovered == 1
    (row,) = ledger.rows("a")
    assert (row["request_id"], row["status"], row["prompt_tokens"], row["priority"]) == (
        "lost",
        "interrupted",
        300,
        5,
    )
    assert ledger.spent("a", Budget("day", tokens=1)) == (300, 0.0)  # it still counts against the budget
    assert Ledger(path).recover_interrupted() == 0  # and only once


def test_recovery_charges_an_interrupted_prompt_at_its_models_price(tmp_path: Path):
    path = tmp_path / "u.db"
    code = (
        "import os; from pathlib import Path; from tokenmill.router.ledger import Ledger; "
        f"l = Ledger(Path({str(path)!r})); l.open_request('a1', 'a', 'k', 'priced', 0, 300); "
        "l.open_request('a2', 'a', 'k', 'free', 0, 50); l.commit(); os._exit(9)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 9
    prices = {"priced": Price(prompt=2.0, completion=8.0)}
    ledger = Ledger(path, prices.get)
    assert ledger.recover_interrupted() == 2
    rows = {r["request_id"]: r for r in ledger.rows("a")}
    assert rows["a1"]["cost"] == pytest.approx(300 * 2.0 / 1e6) and rows["a2"]["cost"] == 0.0
    tokens, dollars = ledger.spent("a", Budget("day", dollars=1.0))
    assert tokens == 350 and dollars == pytest.approx(300 * 2.0 / 1e6)  # the totals agree with the rows
    by_model = {r["model"]: r["cost"] for r in ledger.usage("a", None, None, "model")}
    assert by_model == {"priced": pytest.approx(0.0006), "free": 0.0}


def test_a_streams_checkpointed_completion_is_charged_when_the_gateway_dies(tmp_path: Path):
    path = tmp_path / "u.db"
    code = (
        "import os; from pathlib import Path; from tokenmill.router.ledger import Ledger; "
        f"l = Ledger(Path({str(path)!r})); r = l.open_request('s', 'a', 'k', 'priced', 0, 300); "
        "l.progress(r, 10); l.progress(r, 40); os._exit(9)"  # (no loop: each commits at once)
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 9
    ledger = Ledger(path, {"priced": Price(prompt=2.0, completion=8.0)}.get)
    assert ledger.recover_interrupted() == 1
    (row,) = ledger.rows("a")
    assert (row["status"], row["prompt_tokens"], row["completion_tokens"]) == ("interrupted", 300, 40)
    assert row["cost"] == pytest.approx((300 * 2.0 + 40 * 8.0) / 1e6)
    tokens, dollars = ledger.spent("a", Budget("day", dollars=1.0))
    assert tokens == 340 and dollars == pytest.approx(row["cost"])  # the totals agree with the row


def test_a_checkpoint_waits_for_its_row_and_a_closing_in_the_same_commit_has_the_last_word(
    tmp_path: Path,
):
    ledger = Ledger(tmp_path / "u.db")

    async def run() -> None:
        row = ledger.open_request("s", "a", "k", "m", 0, 10)
        assert not ledger.progress(row, 5)  # not written yet (this turn's commit): the next one will
        await ledger.durable(row)
        assert ledger.progress(row, 50)
        ledger.close_request(row, Closing(10, 64, "ok", 200, "w", 0.1, 0.0))
        await ledger.durable()

    asyncio.run(run())
    (written,) = ledger.rows("a")
    assert (written["status"], written["completion_tokens"]) == ("ok", 64)


def test_keys_are_stored_as_hashes_and_revoked(tmp_path: Path):
    ledger = Ledger(tmp_path / "u.db")
    key, record = ledger.create_key("a", "ci")
    assert key.startswith("tm-") and len(key) > 40
    assert ledger.active_keys()[0] == {hash_key(key): (record.id, "a")}
    assert key not in (tmp_path / "u.db").read_bytes().decode("latin-1")
    assert ledger.revoke_key(record.id).revoked is not None
    assert ledger.active_keys()[0] == {}


def test_teams_persist_and_deleting_one_revokes_its_keys(tmp_path: Path):
    ledger = Ledger(tmp_path / "u.db")
    ledger.save_team(Team("a", models=("m",), priority=3, max_parallel=2))
    ledger.create_key("a")
    assert Ledger(tmp_path / "u.db").teams()["a"] == Team("a", models=("m",), priority=3, max_parallel=2)
    assert ledger.delete_team("a") and not ledger.delete_team("a")
    assert ledger.teams() == {} and ledger.active_keys()[0] == {}


def test_rows_of_one_loop_turn_share_a_commit_and_durable_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(ledger_module, "COMMIT_INTERVAL_S", 0.5)  # wide, for a slow machine
    monkeypatch.setattr(ledger_module, "PACED_FROM", 1)  # paced whenever a request is in flight
    ledger = Ledger(tmp_path / "ledger.db")
    other = sqlite3.connect(tmp_path / "ledger.db")  # another reader sees only what is committed

    def committed() -> int:
        return other.execute("SELECT COUNT(*) FROM usage").fetchone()[0]

    def status(row: UsageRow) -> str:
        return other.execute("SELECT status FROM usage WHERE id = ?", (row.id,)).fetchone()[0]

    async def run() -> None:
        rows = [ledger.open_request(f"r{i}", "search", "key_1", "m", 0, 10) for i in range(3)]
        assert committed() == 0  # still in this turn's group
        await asyncio.sleep(0)  # the turn ends; the ledger was quiet: committed with nobody waiting
        assert committed() == 3 and rows[0].id is not None

        # Right after a commit, the next is paced: it waits for the interval, gathering more.
        ledger.close_request(rows[0], Closing(10, 5, "ok", 200, "w", 0.1, 0.0))
        late = ledger.open_request("r3", "search", "key_1", "m", 0, 10)
        await asyncio.sleep(0)
        assert status(rows[0]) == "in_flight" and committed() == 3
        assert ledger.spent("search", Budget("day", tokens=1)) == (15, 0.0)  # counted, not yet written
        await asyncio.sleep(0.7)
        assert status(rows[0]) == "ok" and committed() == 4

        # Someone waiting brings a paced commit forward to the end of the turn.
        ledger.close_request(rows[1], Closing(10, 5, "ok", 200, "w", 0.1, 0.0))
        started = time.monotonic()
        await ledger.durable()
        assert status(rows[1]) == "ok" and time.monotonic() - started < 0.15
        await ledger.durable(late)  # written already: no wait

    asyncio.run(run())
    row = ledger.open_request("r9", "search", "key_1", "m", 0, 10)  # outside a loop: committed at once
    assert other.execute("SELECT COUNT(*) FROM usage WHERE id = ?", (row.id,)).fetchone()[0] == 1
    other.close()
    ledger.close()


def test_commits_are_paced_only_with_many_requests_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A quiet gateway commits each request in the turn that forwards it; a busy one paces."""
    monkeypatch.setattr(ledger_module, "COMMIT_INTERVAL_S", 0.5)
    monkeypatch.setattr(ledger_module, "PACED_FROM", 3)
    ledger = Ledger(tmp_path / "ledger.db")

    async def run() -> None:
        rows = []
        for i in range(3):
            rows.append(ledger.open_request(f"r{i}", "t", "k", "m", 0, 10))
            await asyncio.sleep(0)
        assert rows[0].id is not None and rows[1].id is not None  # one and two in flight: at once
        assert rows[2].id is None  # three in flight, right after a commit: paced
        ledger.close_request(rows[0], Closing(10, 1, "ok", 200, "w", 0.1, 0.0))
        ledger.close_request(rows[1], Closing(10, 1, "ok", 200, "w", 0.1, 0.0))
        later = ledger.open_request("r3", "t", "k", "m", 0, 10)  # two in flight again
        await asyncio.sleep(0)
        assert later.id is None  # (the paced commit already due takes it, within the interval)
        await asyncio.sleep(0.6)
        assert rows[2].id is not None and later.id is not None

    asyncio.run(run())
    ledger.close()


def test_a_commit_left_pending_by_a_finished_loop_does_not_stall_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(ledger_module, "COMMIT_INTERVAL_S", 0.05)
    monkeypatch.setattr(ledger_module, "PACED_FROM", 1)
    ledger = Ledger(tmp_path / "ledger.db")

    async def burst() -> list[UsageRow]:
        rows = [ledger.open_request("a", "t", "k", "m", 0, 10)]
        await asyncio.sleep(0)  # committed at the end of the turn
        rows.append(ledger.open_request("b", "t", "k", "m", 0, 10))  # paced: the loop ends first
        return rows

    first = asyncio.run(burst())
    assert first[1].id is None

    async def later() -> None:
        await asyncio.sleep(0.1)
        row = ledger.open_request("c", "t", "k", "m", 0, 10)
        await asyncio.sleep(0.01)  # the last commit is long past: this turn's end commits
        assert row.id is not None and first[1].id is not None

    asyncio.run(later())
    ledger.close()


def test_a_turn_is_written_as_one_batch_with_totals_summed(tmp_path: Path):
    """Rows opened and closed in one turn are inserted once, closed; rows written earlier are
    updated; the totals of a turn add up per team, day and model; ids follow the file's."""
    ledger = Ledger(tmp_path / "ledger.db")
    earlier = ledger.open_request("r0", "a", "k", "m", 0, 10)  # outside a loop: written at once
    assert earlier.id == 1

    async def run() -> None:
        rows = [ledger.open_request(f"r{i}", "a", "k", "m", 1, 10) for i in range(1, 4)]
        assert ledger.spent("a", Budget("day", tokens=1)) == (0, 0.0)  # nothing closed yet
        for row in (earlier, rows[0], rows[1]):
            ledger.close_request(row, Closing(12, 3, "ok", 200, "w", 0.1, 0.25))
        assert ledger.spent("a", Budget("day", tokens=1)) == (45, 0.75)  # counted before it is written
        await ledger.durable(rows[0])
        assert [r.id for r in rows] == [2, 3, 4]
        later = ledger.open_request("r4", "a", "k", "m", 1, 10)
        await asyncio.wait_for(ledger.durable(rows[0]), 0.001)  # written already: no wait for later's
        await ledger.durable(later)
        assert later.id == 5

    asyncio.run(run())
    log = {r["request_id"]: r for r in ledger.rows("a")}
    assert [log[f"r{i}"]["status"] for i in range(5)] == ["ok", "ok", "ok", "in_flight", "in_flight"]
    assert [log[f"r{i}"]["prompt_tokens"] for i in range(4)] == [12, 12, 12, 10]  # the worker's count wins
    assert log["r1"]["finished"] is not None and log["r3"]["finished"] is None
    (total,) = ledger.usage("a", None, None, "model")
    assert (total["requests"], total["total_tokens"], total["cost"]) == (3, 45, 0.75)


def test_a_failed_commit_keeps_the_batch_for_the_next_one(tmp_path: Path):
    """The file is locked by another writer: the waiters get the error, nothing is lost."""
    path = tmp_path / "ledger.db"
    ledger = Ledger(path)
    ledger._db.execute("PRAGMA busy_timeout = 0")
    holder = sqlite3.connect(path, isolation_level=None)

    async def run() -> None:
        holder.execute("BEGIN IMMEDIATE")  # the write lock, held
        row = ledger.open_request("r", "a", "k", "m", 0, 10)
        with pytest.raises(sqlite3.OperationalError):
            await ledger.durable()
        assert row.id is None
        ledger.close_request(row, Closing(10, 2, "error", 503, None, 0.0, 0.0))
        holder.execute("ROLLBACK")
        await ledger.durable()
        assert row.id == 1

    asyncio.run(run())
    (row,) = ledger.rows("a")
    assert (row["status"], row["completion_tokens"]) == ("error", 2)
    assert ledger.usage("a", None, None, "model")[0]["requests"] == 1


@given(st.integers(min_value=0, max_value=4_000_000_000_000))
def test_the_day_of_a_timestamp_is_its_utc_date(milliseconds: int):
    # (datetime rounds to the microsecond; day_of floors: they differ only within 0.5 us of midnight)
    timestamp = milliseconds / 1000
    assert day_of(timestamp) == datetime.fromtimestamp(timestamp, UTC).date().isoformat()


def test_one_gateway_claims_a_ledger(tmp_path: Path):
    first, second = Ledger(tmp_path / "u.db"), Ledger(tmp_path / "u.db")
    first.claim()
    with pytest.raises(ValueError, match="in use by another running gateway"):
        second.claim()
    path = str(tmp_path / "u.db")
    code = (
        "from pathlib import Path; from tokenmill.router.ledger import Ledger; "
        f"Ledger(Path({path!r})).claim()"
    )
    taken = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert taken.returncode != 0 and "in use by another running gateway" in taken.stderr
    Ledger(tmp_path / "other.db").claim()  # other ledgers are free
    first.close()  # (or its process ends, however it ends)
    second.claim()


def test_a_row_sqlite_cannot_take_fails_its_commit_alone(tmp_path: Path):
    """A value no check caught must not stop the accounting of every later request."""
    ledger = Ledger(tmp_path / "u.db")

    async def run() -> None:
        bad = ledger.open_request("bad", "a", "k", "m", 2**70, 10)  # the gateway refuses this priority
        with pytest.raises(OverflowError):
            await ledger.durable(bad)
        good = ledger.open_request("good", "a", "k", "m", 0, 10)
        await asyncio.wait_for(ledger.durable(good), 1)
        assert good.id is not None

    asyncio.run(run())
    assert [r["request_id"] for r in ledger.rows("a")] == ["good"]


def test_usage_reports_a_tiny_cost_as_it_is_not_rounded_to_nothing(tmp_path: Path):
    """The QA repro: a row's cost of 1.42e-05 showed as 1.4e-05, and a light user of a cheap model
    saw 0.0."""
    ledger = Ledger(tmp_path / "u.db")
    for cost in (1.42e-05, 3e-09, 1e-10):
        row = ledger.open_request("r", "a", "k", "m", 0, 1)
        ledger.close_request(row, Closing(1, 0, "ok", 200, "w", 0.1, cost))
    row = ledger.open_request("r", "b", "k", "m", 0, 1)
    ledger.close_request(row, Closing(1, 0, "ok", 200, "w", 0.1, 2e-08))  # 0.02 $/M, one token
    costs = {r["team"]: r["cost"] for r in ledger.usage(None, None, None, "model")}
    assert costs == {"a": pytest.approx(1.42031e-05, rel=1e-9), "b": pytest.approx(2e-08, rel=1e-9)}


def test_a_ledger_from_before_team_sources_keeps_its_teams_and_the_file_takes_over_those_it_names(
    tmp_path: Path,
):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:  # the teams table as earlier versions made it
        db.execute("CREATE TABLE teams (name TEXT PRIMARY KEY, config TEXT NOT NULL, updated REAL NOT NULL)")
        for name in ("kept", "named"):
            db.execute("INSERT INTO teams VALUES (?, ?, 0)", (name, '{"priority": 2}'))
    db.close()
    ledger = Ledger(path)
    assert ledger.team_sources() == {"kept": "admin", "named": "admin"}  # kept, as they always were
    assert Ledger(path).teams()["kept"] == Team("kept", priority=2)  # (a second opening: no error)
    ledger.create_key("named")
    ledger.save_team(Team("named", priority=3), source="config")  # the file names it: the file's now
    ledger.save_team(Team("named", priority=4))  # the admin API changes it: still the file's
    ledger.save_team(Team("api"))
    assert ledger.team_sources() == {"kept": "admin", "named": "config", "api": "admin"}
    assert ledger.remove_config_teams(["other"]) == ["named"]  # the file no longer names it
    assert sorted(ledger.teams()) == ["api", "kept"] and ledger.active_keys()[0] == {}
    with pytest.raises(ValueError, match="source must be one of config, admin"):
        ledger.save_team(Team("x"), source="yaml")


def test_a_row_left_in_flight_names_its_worker_whenever_it_was_chosen(tmp_path: Path):
    """The QA repro: rows closed as interrupted at recovery had no worker (it was written only with
    the closing). It goes with the row's insert when chosen in the same turn, else with the next
    checkpoint (``progress``): no statement more."""
    path = tmp_path / "u.db"
    code = (
        "import asyncio, os; from pathlib import Path; from tokenmill.router.ledger import Ledger\n"
        f"l = Ledger(Path({str(path)!r}))\n"
        "async def main():\n"
        "    r = l.open_request('early', 'a', 'k', 'm', 0, 300); r.worker = 'w1'\n"
        "    await l.durable(r)\n"
        "    q = l.open_request('queued', 'a', 'k', 'm', 0, 50)\n"
        "    await l.durable(q)\n"
        "    q.worker = 'w2'; assert q.worker_written is None and r.worker_written == 'w1'\n"
        "    l.progress(q, 0); l.progress(r, 7); await l.durable()\n"
        "asyncio.run(main()); os._exit(9)\n"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 9
    ledger = Ledger(path)
    assert ledger.recover_interrupted() == 2
    rows = {r["request_id"]: r for r in ledger.rows("a")}
    assert (rows["early"]["worker"], rows["early"]["completion_tokens"]) == ("w1", 7)
    assert (rows["queued"]["worker"], rows["queued"]["status"]) == ("w2", "interrupted")


def test_a_rotated_key_names_its_replacement_also_in_a_ledger_from_before_expiry_and_the_link(
    tmp_path: Path,
):
    """After the grace period a rotated key used to look like a revoked one, with nothing to say
    which key took its place."""
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:  # the keys table as versions before expiry made it
        db.execute(
            "CREATE TABLE keys (id TEXT PRIMARY KEY, team TEXT NOT NULL, hash TEXT NOT NULL UNIQUE, "
            "label TEXT, created REAL NOT NULL, revoked REAL)"
        )
        db.execute("INSERT INTO keys VALUES ('key_old', 'a', 'h', 'nightly', 1.0, NULL)")
    db.close()
    ledger = Ledger(path)
    (old,) = ledger.keys()
    assert (old.expires, old.replaced_by, old.active()) == (None, None, True)
    _, new = ledger.rotate_key("key_old", time.time() - 1)  # no grace: stopped already
    rotated = ledger.key("key_old")
    assert rotated is not None and rotated.replaced_by == new.id and not rotated.active()
    assert rotated.to_dict()["replaced_by"] == new.id and new.replaced_by is None
    assert (new.team, new.label) == ("a", "nightly")
    assert Ledger(path).key("key_old") == rotated  # (a second opening: the column is there once)
