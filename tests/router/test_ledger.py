"""The usage ledger: rows, totals, budgets' spend, recovery of a crashed gateway's requests."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from tokenmill.router.gateway_config import Budget, Team
from tokenmill.router.ledger import Closing, Ledger, hash_key


def test_rows_and_totals_by_model_and_day(tmp_path: Path):
    ledger = Ledger(tmp_path / "u.db")
    for team, model, prompt, completion in (
        ("a", "m1", 10, 5),
        ("a", "m1", 20, 5),
        ("a", "m2", 1, 1),
        ("b", "m1", 7, 7),
    ):
        row = ledger.open_request("r", team, "k", model, 0, prompt, started=time.time())
        ledger.close_request(
            row, Closing(prompt, completion, "ok", 200, "w1", 0.1, 0.5), team, model, time.time()
        )
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
    ledger = Ledger(path)
    assert ledger.recovered == 1
    (row,) = ledger.rows("a")
    assert (row["request_id"], row["status"], row["prompt_tokens"], row["priority"]) == (
        "lost",
        "interrupted",
        300,
        5,
    )
    assert ledger.spent("a", Budget("day", tokens=1)) == (300, 0.0)  # it still counts against the budget
    assert Ledger(path).recovered == 0  # and only once


def test_keys_are_stored_as_hashes_and_revoked(tmp_path: Path):
    ledger = Ledger(tmp_path / "u.db")
    key, record = ledger.create_key("a", "ci")
    assert key.startswith("tm-") and len(key) > 40
    assert ledger.active_key_hashes() == {hash_key(key): (record.id, "a")}
    assert key not in (tmp_path / "u.db").read_bytes().decode("latin-1")
    assert ledger.revoke_key(record.id).revoked is not None
    assert ledger.active_key_hashes() == {}


def test_teams_persist_and_deleting_one_revokes_its_keys(tmp_path: Path):
    ledger = Ledger(tmp_path / "u.db")
    ledger.save_team(Team("a", models=("m",), priority=3, max_parallel=2))
    ledger.create_key("a")
    assert Ledger(tmp_path / "u.db").teams()["a"] == Team("a", models=("m",), priority=3, max_parallel=2)
    assert ledger.delete_team("a") and not ledger.delete_team("a")
    assert ledger.teams() == {} and ledger.active_key_hashes() == {}


def test_rows_of_one_loop_turn_share_a_commit_and_durable_waits_for_it(tmp_path: Path):
    ledger = Ledger(tmp_path / "ledger.db")
    other = sqlite3.connect(tmp_path / "ledger.db")  # another reader sees only what is committed

    def committed() -> int:
        return other.execute("SELECT COUNT(*) FROM usage").fetchone()[0]

    async def run() -> None:
        rows = [ledger.open_request(f"r{i}", "search", "key_1", "m", 0, 10) for i in range(3)]
        assert committed() == 0  # still in this turn's group
        await ledger.durable()
        assert committed() == 3  # what the gateway waits for before forwarding

        def status(row: int) -> str:
            return other.execute("SELECT status FROM usage WHERE id = ?", (row,)).fetchone()[0]

        ledger.close_request(rows[0], Closing(10, 5, "ok", 200, "w", 0.1, 0.0), "search", "m", time.time())
        assert status(rows[0]) == "in_flight"
        await asyncio.sleep(0)  # the turn ends: committed with nobody waiting
        assert status(rows[0]) == "ok"

    asyncio.run(run())
    row = ledger.open_request("r9", "search", "key_1", "m", 0, 10)  # outside a loop: committed at once
    assert other.execute("SELECT COUNT(*) FROM usage WHERE id = ?", (row,)).fetchone()[0] == 1
    other.close()
    ledger.close()
