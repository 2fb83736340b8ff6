"""``tokenmill keys`` and ``tokenmill route --gateway-config`` as an operator runs them: a config
mistake is one line naming the field, exit status 2, never a traceback; ``keys list`` shows ids
whole, as ``keys revoke`` needs them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.router.test_route import RouterProcess

TOKENMILL = [sys.executable, "-m", "tokenmill.cli.main"]
ADMIN = "admin-secret-for-cli-tests"


def run(*args: str, columns: int = 80, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    inherited = {k: v for k, v in os.environ.items() if k != "TOKENMILL_ADMIN_KEY"}
    full_env = {**inherited, "HF_HUB_OFFLINE": "1", "COLUMNS": str(columns), **(env or {})}
    return subprocess.run([*TOKENMILL, *args], capture_output=True, text=True, timeout=120, env=full_env)


def config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("prepare", "yaml", "named"),
    [
        # (was sqlite3.OperationalError and a traceback)
        (lambda d: (d / "usage.db").mkdir(), "ledger: usage.db", "ledger must be a file, not a folder"),
        # (was "[Errno 17] File exists", not naming the ledger)
        (
            lambda d: (d / "plain").write_text(""),
            "ledger: plain/usage.db",
            "ledger {d}/plain/usage.db cannot be made",
        ),
        # (made a database file named "None")
        (None, "ledger:", "ledger must be the SQLite file's path"),
        (
            lambda d: (d / "usage.db").write_text("not a database " * 100),
            "ledger: usage.db",
            "cannot be opened as the gateway's SQLite file",
        ),
        (None, "queue: {overflow: 50}", "queue.overflow must be a number from 0 to 1, got 50"),
        (None, "default_max_tokens: 0", "(or absent: 1024), got 0"),
        (None, "teams: {premium: {priority: 99999999999999999999999}}", "-2147483648 to 2147483647"),
        (None, "teams: {a/b: {}}", "the team name 'a/b' must be 1-64 characters from A-Z a-z 0-9 - _ ."),
    ],
)
def test_a_config_mistake_is_one_line_naming_the_field_and_exit_2(tmp_path: Path, prepare, yaml, named):
    if prepare is not None:
        prepare(tmp_path)
    path = config(tmp_path, yaml)
    done = run("keys", "list", "--config", str(path))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert named.format(d=tmp_path) in done.stderr
    assert not (tmp_path / "None").exists()


def test_route_exits_2_on_a_ledger_it_cannot_open(tmp_path: Path):
    (tmp_path / "usage.db").mkdir()
    path = config(tmp_path, "ledger: usage.db")
    done = run("route", "--worker", "http://127.0.0.1:9", "--gateway-config", str(path))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    folder = tmp_path / "usage.db"
    expected = f"error: ledger must be a file, not a folder: {folder} is a folder (name a file in it, e.g. "
    assert done.stderr.strip().splitlines() == [f"{expected}{folder / 'usage.db'})"]


def test_keys_list_never_cuts_an_id_in_80_columns(tmp_path: Path):
    team = "a-team-with-a-rather-long-name"
    path = config(tmp_path, f"ledger: usage.db\nteams:\n  {team}: {{}}\n")
    label = "the nightly evaluation pipeline of the search team [bold]"
    made = run("keys", "create", "--team", team, "--label", label, "--config", str(path))
    assert made.returncode == 0, made.stderr
    key_id = re.search(r"key (key_\w+) for team", made.stderr).group(1)
    listed = run("keys", "list", "--config", str(path), columns=80)
    assert listed.returncode == 0 and key_id in listed.stdout  # (was "key_acad4585f…")
    assert "[bold]" in listed.stdout  # a label is text, never markup
    assert max(len(line) for line in listed.stdout.splitlines()) <= 80
    assert run("keys", "revoke", key_id, "--config", str(path)).returncode == 0


def test_keys_rotate_prints_the_new_key_once_and_the_old_one_works_through_its_grace(tmp_path: Path):
    path = config(tmp_path, "ledger: usage.db\nteams:\n  search: {}\n")
    made = run("keys", "create", "--team", "search", "--label", "nightly", "--config", str(path))
    old_id = re.search(r"key (key_\w+) for team", made.stderr).group(1)
    rotated = run("keys", "rotate", old_id, "--grace-s", "3600", "--config", str(path))
    assert rotated.returncode == 0, rotated.stderr
    assert rotated.stdout.startswith("tm-") and len(rotated.stdout.split()) == 1  # the key alone on stdout
    assert f"replaces {old_id}, which stops working in 3600 s (at " in rotated.stderr
    new_id = re.search(r"key (key_\w+) for team search replaces", rotated.stderr).group(1)
    listed = run("keys", "list", "--config", str(path), columns=200)
    assert "(rotated: works until then)" in listed.stdout and listed.stdout.count("nightly") == 2
    narrow = run("keys", "list", "--config", str(path), columns=80).stdout  # ids whole, the new under the old
    assert f"-> {new_id}" in narrow and old_id in narrow
    assert narrow.index(old_id) < narrow.index(f"-> {new_id}") < narrow.rindex(new_id)
    again = run("keys", "rotate", old_id, "--config", str(path))
    assert again.returncode == 2 and f"key {old_id} was rotated or revoked already" in again.stderr
    for bad in ("-1", "2592001", "soon"):
        refused = run("keys", "rotate", old_id, "--grace-s", bad, "--config", str(path))
        assert refused.returncode == 2 and "--grace-s" in refused.stderr, refused.stderr


def test_keys_commands_change_no_team_even_with_a_config_that_dropped_one(tmp_path: Path):
    """`keys list` with an edited config revoked the keys of the team it no longer named, before
    any gateway restart."""
    both = config(tmp_path, "ledger: usage.db\nteams:\n  search: {}\n  ads: {}\n")
    made = run("keys", "create", "--team", "ads", "--config", str(both))
    key_id = re.search(r"key (key_\w+) for team", made.stderr).group(1)
    from tokenmill.router.gateway import Gateway
    from tokenmill.router.gateway_config import load_gateway_config

    Gateway(load_gateway_config(both)).ledger.close()  # a gateway's start: the file's teams in the ledger
    fewer = tmp_path / "fewer.yaml"
    fewer.write_text("ledger: usage.db\nteams:\n  search: {}\n")
    listed = run("keys", "list", "--config", str(fewer), columns=200)
    assert listed.returncode == 0 and "removed teams" not in listed.stderr
    row = next(line for line in listed.stdout.splitlines() if key_id in line)
    assert "UTC" in row and row.count("UTC") == 1  # created only: not revoked


def test_keys_create_makes_a_key_that_expires_and_list_shows_when(tmp_path: Path):
    path = config(tmp_path, "ledger: usage.db\nteams:\n  search: {}\n")
    made = run("keys", "create", "--team", "search", "--expires-in-s", "86400", "--config", str(path))
    assert made.returncode == 0 and made.stdout.startswith("tm-"), made.stderr
    assert re.search(r"key key_\w+ for team search, expires \d{4}-\d\d-\d\d", made.stderr)
    listed = run("keys", "list", "--config", str(path), columns=200)
    assert "expires" in listed.stdout and listed.stdout.count("UTC") == 2  # created, expires
    for bad in ("0", "-5", "315360001", "soon"):
        refused = run("keys", "create", "--team", "search", "--expires-in-s", bad, "--config", str(path))
        assert refused.returncode == 2 and "--expires-in-s" in refused.stderr, refused.stderr


def test_keys_create_refuses_a_label_the_api_would_refuse(tmp_path: Path):
    path = config(tmp_path, "teams: {search: {}}")
    done = run("keys", "create", "--team", "search", "--label", "x" * 257, "--config", str(path))
    assert done.returncode == 2 and "--label must be a string of at most 256 characters" in done.stderr


def test_keys_list_shows_an_old_labels_control_characters_as_escapes(tmp_path: Path):
    import sqlite3

    path = config(tmp_path, "ledger: usage.db\nteams: {search: {}}")
    assert run("keys", "create", "--team", "search", "--config", str(path)).returncode == 0
    with sqlite3.connect(tmp_path / "usage.db") as db:  # a label made before labels were checked
        db.execute("UPDATE keys SET label = ?", ("\x1b[2Jcleared\x07",))
    listed = run("keys", "list", "--config", str(path), columns=200)
    assert listed.returncode == 0 and "\x1b" not in listed.stdout and "\x07" not in listed.stdout
    assert "\\x1b[2Jcleared\\x07" in listed.stdout


def test_route_status_sends_the_admin_key_a_gateway_requires(tmp_path: Path):
    path = config(tmp_path, "ledger: usage.db\nteams: {search: {}}")
    router = RouterProcess(
        "http://127.0.0.1:9", extra=("--gateway-config", str(path)), env={"TOKENMILL_ADMIN_KEY": ADMIN}
    )
    try:
        assert httpx.get(f"{router.url}/router/workers", timeout=10).status_code == 401
        refused = run("route", "status", router.url, env={"TOKENMILL_ADMIN_KEY": ""}, columns=300)
        assert refused.returncode == 2 and "answered 401: the admin key is required" in refused.stderr
        assert "$TOKENMILL_ADMIN_KEY" in refused.stderr and "Traceback" not in refused.stderr
        shown = run("route", "status", router.url, env={"TOKENMILL_ADMIN_KEY": ADMIN}, columns=300)
        assert shown.returncode == 0 and "policy round_robin" in shown.stdout, shown.stderr
    finally:
        router.stop()
