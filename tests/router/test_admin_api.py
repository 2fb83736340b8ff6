"""The gateway's own endpoints as a client reaches them through the router's ASGI app: admin
teams and keys, /v1/usage, /v1/models and /router/workers; every refusal in OpenAI's shape with
``param`` naming the field."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from tokenmill.router.app import RouterApp
from tokenmill.router.gateway import Gateway
from tokenmill.router.gateway_config import parse_gateway_config
from tokenmill.router.policies import Router
from tokenmill.router.workers import WorkerPool

ADMIN = "admin-secret-for-admin-tests"
ADMIN_HEADERS = {"authorization": f"Bearer {ADMIN}"}
CONFIG = {
    "ledger": "usage.db",
    "teams": {
        "premium": {"models": ["demo"], "priority": 10},
        "elsewhere": {"models": ["another-model"]},
    },
}


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.raw = status, headers, body

    def json(self) -> dict:
        return json.loads(self.raw)

    @property
    def error(self) -> dict:
        return self.json()["error"]


async def call(
    app: RouterApp,
    method: str,
    path: str,
    body: bytes | dict | None = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    """One request through the app's ASGI interface, as the router's HTTP server makes it."""
    path, _, query = path.partition("?")
    raw = json.dumps(body).encode() if isinstance(body, dict) else (body or b"")
    messages = [{"type": "http.request", "body": raw, "more_body": False}]

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": query.encode(),
        "headers": [(k.encode(), v.encode()) for k, v in (headers or {}).items()],
    }
    await app(scope, receive, send)
    head = sent[0]
    return Answer(
        head["status"],
        {k.decode(): v.decode() for k, v in head["headers"]},
        b"".join(m.get("body", b"") for m in sent[1:]),
    )


def admin(app: RouterApp, method: str, path: str, body: bytes | dict | None = None) -> Answer:
    return asyncio.run(call(app, method, path, body, ADMIN_HEADERS))


@pytest.fixture
def gateway(tmp_path: Path, monkeypatch) -> Gateway:
    monkeypatch.setenv("TOKENMILL_ADMIN_KEY", ADMIN)
    gateway = Gateway(parse_gateway_config(CONFIG, tmp_path))
    yield gateway
    gateway.ledger.close()


@pytest.fixture
def app(gateway: Gateway) -> RouterApp:
    return RouterApp(WorkerPool(["http://127.0.0.1:9"]), Router("least_load"), gateway=gateway)


def assert_refused(answer: Answer, status: int, param: str | None, *named: str) -> None:
    assert answer.status == status, answer.raw
    assert set(answer.error) == {"message", "type", "param", "code"}
    assert answer.error["param"] == param, answer.error
    for words in named:
        assert words in answer.error["message"], answer.error["message"]


# -- teams --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param", "named"),
    [
        # The ledger (and workers) keep priorities as int32: this one used to be accepted, and
        # every usage row of the team then dropped by the ledger (OverflowError).
        (b'{"name": "x", "priority": 99999999999999999999999}', "priority", "-2147483648 to 2147483647"),
        (b'{"name": "x", "tokens_per_minute": 1' + b"0" * 400 + b"}", "tokens_per_minute", "1 to 9007"),
        (b'{"name": "x", "weight": 1' + b"0" * 400 + b"}", "weight", "<= 1000000"),
        (b'{"name": "x", "budget": {"dollars": 1' + b"0" * 400 + b"}}", "budget.dollars", "0 to 1e+15"),
        (b'{"name": "x", "budget": {"tokens": 0}}', "budget.tokens", "1 to 9007"),
        (b'{"name": "x", "pool": "fast"}', "pool", "latency, throughput"),  # param was null
        # A lone surrogate was a plain-text 500 (UnicodeEncodeError writing the ledger).
        (b'{"name": "t\\ud800"}', "name", "A-Z a-z 0-9 - _ ."),
        (b'{"name": "x", "models": ["m\\ud800"]}', "models", "unpaired"),
        # "a/b" could be created but never deleted: DELETE /admin/teams/a/b is another path.
        (b'{"name": "a/b"}', "name", "1-64 characters from A-Z a-z 0-9 - _ . starting with a letter"),
        (b'{"name": ".."}', "name", "starting with a letter or digit"),
        (b'{"name": ""}', "name", "1-64 characters"),
        (b'{"priority": 1}', "name", "got null"),
        (b'{"name": "x", "prority": 1}', "prority", "unknown fields ['prority']: allowed ['budget',"),
    ],
)
def test_a_team_the_gateway_cannot_keep_is_a_400_naming_the_field(app, gateway, body, param, named):
    assert_refused(admin(app, "POST", "/admin/teams", body), 400, param, named)
    assert set(gateway.teams) == {"premium", "elsewhere"}  # nothing half made


def test_a_team_with_a_safe_name_is_created_and_deleted(app, gateway):
    made = admin(app, "POST", "/admin/teams", {"name": "search.v2-eu_1", "priority": -(2**31)})
    assert made.status == 200 and made.json()["priority"] == -(2**31) and "note" not in made.json()
    gone = admin(app, "DELETE", "/admin/teams/search.v2-eu_1")
    assert gone.status == 200 and gone.json() == {"deleted": "search.v2-eu_1"}  # not in the file
    assert "search.v2-eu_1" not in gateway.teams


def test_deleting_or_changing_a_team_of_the_config_file_says_the_file_wins_at_restart(app, gateway, tmp_path):
    changed = admin(app, "POST", "/admin/teams", {"name": "premium", "priority": 3})
    assert changed.status == 200 and "config file" in changed.json()["note"]
    gone = admin(app, "DELETE", "/admin/teams/premium").json()
    assert gone["deleted"] == "premium" and gone["in_config"] is True
    assert "returns at the next start" in gone["note"] and "unless it is removed there" in gone["note"]
    gateway.ledger.close()
    restarted = Gateway(parse_gateway_config(CONFIG, tmp_path))  # as the note says
    assert restarted.teams["premium"].priority == 10
    restarted.ledger.close()


# -- keys ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param", "named"),
    [
        (
            {"team": "premium", "lable": "typo"},
            "lable",
            "unknown fields ['lable']: allowed ['expires_in_s', 'label', 'team']",
        ),
        ({"team": "premium", "label": "x" * 5_000_000}, "label", "at most 256 characters"),
        (b'{"team": "premium", "label": "x\\ud800"}', "label", "unpaired"),
        ({"team": "premium", "label": 5}, "label", "must be a string"),
        ({"team": "nobody"}, "team", "must name an existing team"),
    ],
)
def test_a_key_request_the_gateway_would_not_keep_as_sent_is_a_400(app, gateway, body, param, named):
    assert_refused(admin(app, "POST", "/admin/keys", body), 400, param, named)
    assert gateway.ledger.keys() == []


@pytest.mark.parametrize(
    ("action", "field"), [("revoke", "grace_s"), ("revoke", "grace"), ("rotate", "grace")]
)
def test_revoke_and_rotate_refuse_fields_they_do_not_take_and_keep_the_key(app, gateway, action, field):
    """A field sent to revoke or rotate was ignored (a 200), unlike every other admin body."""
    key_id = admin(app, "POST", "/admin/keys", {"team": "premium"}).json()["id"]
    refused = admin(app, "POST", f"/admin/keys/{key_id}/{action}", {field: 60})
    assert_refused(refused, 400, field, f"unknown fields ['{field}']")
    assert [k.id for k in gateway.ledger.keys("premium") if k.revoked is None] == [key_id]  # nothing done
    assert admin(app, "POST", f"/admin/keys/{key_id}/{action}").status == 200  # no body: done


def test_a_rotated_key_works_through_its_grace_period_then_stops(app, gateway, monkeypatch):
    monkeypatch.setattr("tokenmill.router.gateway_keys.KEYS_REFRESH_S", 0.0)  # (re-read every request)
    old, record = gateway.create_key("premium")
    asked = time.time()
    rotated = admin(app, "POST", f"/admin/keys/{record.id}/rotate", {"grace_s": 0.5})
    assert rotated.status == 200 and rotated.json()["replaces"] == record.id
    assert asked + 0.5 <= rotated.json()["replaces_until"] <= time.time() + 0.5
    new, new_id = rotated.json()["key"], rotated.json()["id"]
    assert gateway.caller({"authorization": f"Bearer {old}"}) == (record.id, "premium")
    assert gateway.caller({"authorization": f"Bearer {new}"}) == (rotated.json()["id"], "premium")
    listed = {k["id"]: k for k in admin(app, "GET", "/admin/keys").json()["keys"]}
    assert listed[record.id]["active"] is True and listed[record.id]["revoked"] is not None
    again = admin(app, "POST", f"/admin/keys/{record.id}/rotate")  # a key on its way out: rotated already
    assert_refused(again, 409, None, f"key {record.id} was rotated or revoked already: it stops working at")
    assert_refused(admin(app, "POST", "/admin/keys/key_000000000000/rotate"), 404, None, "no key")
    time.sleep(0.6)
    assert gateway.caller({"authorization": f"Bearer {old}"}) is None
    assert gateway.caller({"authorization": f"Bearer {new}"}) is not None
    listed = {k["id"]: k for k in admin(app, "GET", "/admin/keys").json()["keys"]}
    assert listed[record.id]["active"] is False  # ... and still names the key that took its place
    assert listed[record.id]["replaced_by"] == rotated.json()["id"] and listed[new_id]["replaced_by"] is None


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/admin/keys/{key_id}/rotate", "grace_s"),
        ("/admin/keys", "expires_in_s"),
        ("/admin/teams", "priority"),
    ],
)
def test_a_body_field_sent_in_the_query_is_refused_with_where_it_goes(app, gateway, path, field):
    """`?grace_s=60` got "unknown query parameters", which did not say the body takes it."""
    key_id = admin(app, "POST", "/admin/keys", {"team": "premium"}).json()["id"]
    keys = gateway.ledger.keys  # (a method: every key)
    before = [(k.id, k.revoked) for k in keys()]
    refused = admin(app, "POST", path.format(key_id=key_id) + f"?{field}=60", {"team": "premium"})
    assert_refused(refused, 400, field, f'{field} goes in the JSON body, not the query: {{"{field}": ...}}')
    assert [(k.id, k.revoked) for k in keys()] == before  # nothing made, nothing rotated
    assert_refused(admin(app, "GET", "/admin/keys?grace_s=1"), 400, "grace_s", "unknown query parameters")


@pytest.mark.parametrize("end", ["revoke", "delete the team"])
def test_a_key_in_its_grace_period_stops_at_once_when_revoked_or_its_team_deleted(app, gateway, end):
    old, record = gateway.create_key("premium")
    assert admin(app, "POST", f"/admin/keys/{record.id}/rotate", {"grace_s": 3600}).status == 200
    assert gateway.caller({"authorization": f"Bearer {old}"}) is not None
    if end == "revoke":
        assert admin(app, "POST", f"/admin/keys/{record.id}/revoke").json()["active"] is False
    else:
        assert admin(app, "DELETE", "/admin/teams/premium").status == 200
    assert gateway.caller({"authorization": f"Bearer {old}"}) is None
    assert gateway.ledger.key(record.id).revoked <= time.time()


def test_a_key_of_a_team_this_gateway_no_longer_has_is_refused_everywhere_and_not_rotated(app, gateway):
    """A team deleted through the API while ``tokenmill keys`` (another process) made a key for it:
    the key was a 500 on rotate, a 200 on /v1/usage and a 403 on admin routes."""
    del gateway.teams["elsewhere"]  # as the API's delete leaves it, with the key made since
    key, record = gateway.ledger.create_key("elsewhere")
    bearer = {"authorization": f"Bearer {key}"}
    assert_refused(admin(app, "POST", f"/admin/keys/{record.id}/rotate"), 409, None, "no longer exists")
    assert [k.id for k in gateway.ledger.keys("elsewhere")] == [record.id]  # nothing made
    for path in ("/v1/usage", "/admin/teams"):
        assert_refused(asyncio.run(call(app, "GET", path, headers=bearer)), 401, None, "key is required")


def test_two_rotations_of_one_key_at_once_make_one_new_key(tmp_path: Path):
    """Each through its own connection (two `tokenmill keys rotate` at once): one wins."""
    import threading

    from tokenmill.router.ledger import Ledger

    Ledger(tmp_path / "u.db").create_key("premium")
    (old,) = Ledger(tmp_path / "u.db").keys()
    ledgers = [Ledger(tmp_path / "u.db") for _ in range(6)]
    start, results = threading.Barrier(len(ledgers)), []

    def rotate(ledger: Ledger) -> None:
        start.wait()
        results.append(ledger.rotate_key(old.id, time.time() + 60))

    threads = [threading.Thread(target=rotate, args=(ledger,)) for ledger in ledgers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r is not None for r in results) == 1
    assert len(ledgers[0].keys("premium")) == 2


def test_the_admin_api_of_a_gateway_without_an_admin_key_says_it_is_off(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("TOKENMILL_ADMIN_KEY", raising=False)
    gateway = Gateway(parse_gateway_config(CONFIG, tmp_path))
    app = RouterApp(WorkerPool(["http://127.0.0.1:9"]), Router("least_load"), gateway=gateway)
    key, _ = gateway.create_key("premium")
    for headers in ({}, {"authorization": f"Bearer {key}"}):
        answer = asyncio.run(call(app, "GET", "/admin/keys", headers=headers))
        assert_refused(answer, 403, None, "the admin API is off on this gateway", "$TOKENMILL_ADMIN_KEY")
    gateway.ledger.close()


def test_a_key_made_to_expire_works_until_then_and_its_rotation_keeps_the_expiry(app, gateway, monkeypatch):
    monkeypatch.setattr("tokenmill.router.gateway_keys.KEYS_REFRESH_S", 0.0)  # (re-read every request)
    made = admin(app, "POST", "/admin/keys", {"team": "premium", "expires_in_s": 0.8})
    assert made.status == 200 and made.json()["active"] is True
    assert made.json()["expires"] == pytest.approx(time.time() + 0.8, abs=0.5)
    assert made.json()["revoked"] is None
    rotated = admin(app, "POST", f"/admin/keys/{made.json()['id']}/rotate", {"grace_s": 60})
    assert rotated.json()["expires"] == made.json()["expires"]  # the secret changes, not the policy
    assert rotated.json()["replaces_until"] == made.json()["expires"]  # the grace ends at the expiry
    assert gateway.ledger.key(made.json()["id"]).revoked == made.json()["expires"]
    keys = (made.json()["key"], rotated.json()["key"])
    assert all(gateway.caller({"authorization": f"Bearer {k}"}) is not None for k in keys)
    time.sleep(1.0)
    assert all(gateway.caller({"authorization": f"Bearer {k}"}) is None for k in keys)
    listed = {k["id"]: k for k in admin(app, "GET", "/admin/keys").json()["keys"]}
    assert listed[rotated.json()["id"]]["active"] is False
    again = admin(app, "POST", f"/admin/keys/{rotated.json()['id']}/rotate")
    assert_refused(again, 409, None, "was expired already: it stopped working at")


@pytest.mark.parametrize("ends", ["expiry", "grace"])
def test_a_key_stops_at_its_expiry_or_the_end_of_its_grace_not_at_the_next_read_of_the_keys(
    app, gateway, monkeypatch, ends
):
    """Keys worked up to a second past their stop: expiry was applied when the gateway re-read
    its keys (every two seconds)."""
    monkeypatch.setattr("tokenmill.router.gateway_keys.KEYS_REFRESH_S", 3600.0)  # no re-read in this test
    if ends == "expiry":
        made = admin(app, "POST", "/admin/keys", {"team": "premium", "expires_in_s": 0.5}).json()
        key, stops = made["key"], made["expires"]
    else:
        key, record = gateway.create_key("premium")
        rotated = admin(app, "POST", f"/admin/keys/{record.id}/rotate", {"grace_s": 0.5}).json()
        stops = rotated["replaces_until"]
    auth = {"authorization": f"Bearer {key}"}
    assert gateway.caller(auth) is not None
    time.sleep(max(0.0, stops - time.time()) + 0.01)
    assert gateway.caller(auth) is None


def test_the_workers_admin_route_refuses_a_query_and_changes_nothing(app, gateway):
    """`?url=` or `?action=` was ignored: the body's order was carried out with a 200."""
    before = [w.url for w in app.pool.workers]
    order = {"url": "http://127.0.0.1:2", "action": "add"}
    for query, param, words in [
        ("url=http://127.0.0.1:1", "url", "url goes in the JSON body, not the query"),
        ("action=add", "action", "action goes in the JSON body, not the query"),
        ("foo=1", "foo", 'it takes no query parameters, got "foo"'),
    ]:
        assert_refused(admin(app, "POST", f"/admin/workers?{query}", order), 400, param, words)
    assert [w.url for w in app.pool.workers] == before


@pytest.mark.parametrize("expires", [0, -1, "60", True, 10 * 365 * 86400 + 1, 1e300])
def test_an_expiry_the_gateway_cannot_keep_is_a_400_and_no_key_is_made(app, gateway, expires):
    refused = admin(app, "POST", "/admin/keys", {"team": "premium", "expires_in_s": expires})
    assert_refused(refused, 400, "expires_in_s", "expires_in_s must be seconds above 0 and at most 315360000")
    assert gateway.ledger.keys() == []
    unset = admin(app, "POST", "/admin/keys", {"team": "premium", "expires_in_s": None})
    assert unset.status == 200 and unset.json()["expires"] is None  # null: until revoked


def test_a_ledger_made_before_keys_expired_is_read_and_its_keys_never_expire(tmp_path: Path):
    import sqlite3

    from tokenmill.router.ledger import Ledger

    old = sqlite3.connect(tmp_path / "u.db")
    old.execute(
        "CREATE TABLE keys (id TEXT PRIMARY KEY, team TEXT NOT NULL, hash TEXT NOT NULL UNIQUE, "
        "label TEXT, created REAL NOT NULL, revoked REAL)"
    )
    old.execute("INSERT INTO keys VALUES ('key_0', 'premium', 'h', NULL, 1.0, NULL)")
    old.commit()
    old.close()
    ledger = Ledger(tmp_path / "u.db")
    (record,) = ledger.keys()
    assert record.expires is None and record.active()
    assert ledger.active_keys()[0] == {"h": ("key_0", "premium")}
    _, made = ledger.create_key("premium", None, time.time() + 60)
    assert ledger.key(made.id).expires == made.expires


def test_a_refused_value_is_quoted_back_as_json_spells_it(app):
    refused = admin(app, "POST", "/admin/keys", {"team": "premium", "expires_in_s": True})
    assert_refused(refused, 400, "expires_in_s", "got true")
    digits = b'{"team": "premium", "expires_in_s": ' + b"9" * 80 + b"}"
    assert_refused(admin(app, "POST", "/admin/keys", digits), 400, "expires_in_s", "9" * 59 + "…")


@pytest.mark.parametrize("grace", [-1, "60", True, None, 30 * 86400 + 1, 1e300])
def test_a_grace_period_the_gateway_cannot_keep_is_a_400_and_the_key_stays(app, gateway, grace):
    _, record = gateway.create_key("premium")
    refused = admin(app, "POST", f"/admin/keys/{record.id}/rotate", {"grace_s": grace})
    assert_refused(refused, 400, "grace_s", "grace_s must be seconds from 0 to 2592000 (30 days)")
    assert [k.id for k in gateway.ledger.keys("premium")] == [record.id]  # no new key either
    assert gateway.ledger.key(record.id).revoked is None


def test_a_key_with_a_label_of_256_characters_is_made(app):
    made = admin(app, "POST", "/admin/keys", {"team": "premium", "label": "é" * 256})
    assert made.status == 200 and made.json()["label"] == "é" * 256 and made.json()["key"].startswith("tm-")


# -- methods and paths --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", "/admin/teams", "GET, POST"),
        ("GET", "/admin/teams/premium", "DELETE"),
        ("DELETE", "/admin/keys", "GET, POST"),
        ("GET", "/admin/keys/key_0/revoke", "POST"),
        ("POST", "/v1/usage", "GET"),
        ("POST", "/v1/models", "GET"),
        ("POST", "/router/workers", "GET"),
        ("GET", "/admin/workers", "POST"),
        ("GET", "/v1/chat/completions", "POST"),
    ],
)
def test_a_known_path_with_another_method_is_a_405_naming_the_allowed_ones(app, method, path, allow):
    answer = admin(app, method, path)
    assert answer.status == 405 and answer.headers["allow"] == allow
    assert allow.replace(", ", " or ") in answer.error["message"] and answer.error["type"]


def test_an_unknown_admin_path_is_still_a_404(app):
    assert admin(app, "DELETE", "/admin/teams/a/b").status == 404
    assert admin(app, "GET", "/admin/nothing").status == 404


# -- usage --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "param", "named"),
    [
        ("from=2024-05-02&to=2024-05-01", "from", "from (2024-05-02) is after to (2024-05-01)"),
        ("start=2024-05-01", "start", "parameters ['start']; allowed: from, to, group_by, team"),
        ("group_by=", "group_by", 'group_by must be model or day, got ""'),
        ("from=", "from", "from must be a date"),
        ("group_by=day&group_by=model", "group_by", "given 2 times"),
        ("team=", "team", "team must name a team"),
    ],
)
def test_a_usage_query_it_cannot_answer_as_asked_is_a_400(app, query, param, named):
    assert_refused(admin(app, "GET", f"/v1/usage?{query}"), 400, param, named)


def test_a_usage_query_over_one_day_is_answered(app):
    answer = admin(app, "GET", "/v1/usage?from=2024-05-01&to=2024-05-01&group_by=day")
    assert answer.status == 200 and answer.json()["data"] == []


def test_an_unknown_admin_query_parameter_is_a_400(app):
    assert_refused(admin(app, "GET", "/admin/keys?tem=premium"), 400, "tem", "allowed: team")
    assert admin(app, "GET", "/admin/keys?team=premium").status == 200


# -- what a key may see -------------------------------------------------------------------------


def test_the_fleet_view_needs_the_admin_key_behind_a_gateway(app, gateway):
    key, _ = gateway.create_key("premium")
    for headers in ({}, {"authorization": "Bearer tm-not-a-key"}):
        answer = asyncio.run(call(app, "GET", "/router/workers", headers=headers))
        assert_refused(answer, 401, None, "the admin key is required")
        assert answer.error["type"] == "authentication_error"
    for path in ("/router/workers", "/admin/teams"):  # a team's key is known, and not allowed: 403
        answer = asyncio.run(call(app, "GET", path, headers={"authorization": f"Bearer {key}"}))
        assert_refused(answer, 403, None, "a key of team premium cannot use this route")
        assert answer.error["type"] == "permission_error"
    assert admin(app, "GET", "/router/workers").json()["queues"] == {}
    assert asyncio.run(call(app, "GET", "/metrics")).status == 200  # Prometheus scrapes without keys


def test_without_a_gateway_the_fleet_view_stays_open(gateway):
    app = RouterApp(WorkerPool(["http://127.0.0.1:9"]), Router("least_load"))
    assert asyncio.run(call(app, "GET", "/router/workers")).status == 200


def test_models_need_a_key_and_list_only_the_teams_without_paths(worker, gateway):
    app = RouterApp(WorkerPool([worker.url]), Router("least_load"), gateway=gateway)
    premium, _ = gateway.create_key("premium")
    elsewhere, _ = gateway.create_key("elsewhere")

    async def run() -> list[Answer]:
        try:
            return [
                await call(app, "GET", "/v1/models", headers=h)
                for h in (
                    {},
                    {"authorization": "Bearer tm-not-a-key"},
                    {"authorization": f"Bearer {premium}"},
                    {"x-api-key": elsewhere},
                    ADMIN_HEADERS,
                )
            ]
        finally:
            await app.stop()

    nobody, wrong, mine, none_allowed, everything = asyncio.run(run())
    assert_refused(nobody, 401, None, "a valid API key is required")
    assert_refused(wrong, 401, None, "a valid API key is required")
    assert [m["id"] for m in mine.json()["data"]] == ["demo"]
    assert "root" not in mine.json()["data"][0] and "max_model_len" in mine.json()["data"][0]
    assert none_allowed.status == 200 and none_allowed.json()["data"] == []
    assert everything.json()["data"][0]["root"] is not None  # the admin sees what the workers say


@pytest.mark.parametrize(
    ("env", "configured", "warning"),
    [
        ("   ", False, "is not set (or blank): the admin API is closed"),
        ("short", True, "is shorter than 16 characters"),
        (f"  {ADMIN}  ", True, None),
    ],
)
def test_the_admin_key_is_stripped_and_a_blank_or_short_one_is_warned_about(
    tmp_path, monkeypatch, capsys, env, configured, warning
):
    """A blank admin key closed the admin API without a word, and one with spaces around it could
    never match (a request's key is stripped); a one-character key was taken silently."""
    from tokenmill.cli.route import _gateway

    (tmp_path / "g.yaml").write_text(f"ledger: {tmp_path / 'usage.db'}\nteams: {{a: {{}}}}\n")
    monkeypatch.setenv("TOKENMILL_ADMIN_KEY", env)
    gateway = _gateway(tmp_path / "g.yaml")
    try:
        assert gateway.is_configured_admin is configured
        if configured:
            assert gateway.is_admin({"authorization": f"Bearer {env.strip()}"})
        said = " ".join(capsys.readouterr().err.split())
        assert (warning in said) if warning else "warning" not in said, said
    finally:
        gateway.ledger.close()
