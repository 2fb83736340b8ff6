"""Where the gateway's teams come from: the YAML file, applied at every start (a team removed from
it is removed, its keys revoked), or the admin API (kept until deleted there)."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.router.test_gateway import ADMIN, admin, create_key
from tests.router.test_route import RouterProcess

NOWHERE = "http://127.0.0.1:9"  # no worker: nothing here needs one (keys and teams are the gateway's)


def start(config: Path) -> RouterProcess:
    return RouterProcess(NOWHERE, extra=("--gateway-config", str(config)), env={"TOKENMILL_ADMIN_KEY": ADMIN})


def models(url: str, key: str) -> int:
    return httpx.get(f"{url}/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=30).status_code


def test_a_team_removed_from_the_config_is_removed_at_the_next_start_and_an_admin_team_stays(
    tmp_path: Path,
):
    """The QA repro: team b removed from the YAML still worked after a restart, with its old
    limits, and the start line counted it."""
    config = tmp_path / "gateway.yaml"
    config.write_text("ledger: k.db\nteams: {a: {}, b: {tokens_per_minute: 5000}}\n")
    b = create_key(config, "b")
    first = start(config)
    try:
        made = admin("POST", first.url, "/admin/teams", json={"name": "c", "tokens_per_minute": 10})
        assert made.status_code == 200
        c = admin("POST", first.url, "/admin/keys", json={"team": "c"}).json()["key"]
        same = admin("POST", first.url, "/admin/teams", json={"name": "b", "tokens_per_minute": 6000})
        assert same.status_code == 200  # changed through the API: still the file's team
        assert models(first.url, b) == 200 and models(first.url, c) == 200
    finally:
        first.stop()
    config.write_text("ledger: k.db\nteams: {a: {}}\n")  # b removed
    second = start(config)
    try:
        log = " ".join(second.log_before_ready.split())
        assert "removed teams b, and revoked their keys" in log
        assert "gateway: 2 teams" in second.ready_line  # a, and c from the admin API
        assert models(second.url, b) == 401 and models(second.url, c) == 200
        teams = admin("GET", second.url, "/admin/teams").json()
        assert sorted(t["name"] for t in teams["teams"]) == ["a", "c"]
        assert all(k["revoked"] for k in admin("GET", second.url, "/admin/keys?team=b").json()["keys"])
    finally:
        second.stop()
