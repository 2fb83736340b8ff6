"""``tokenmill route --gateway-config``: keys, model access, limits, usage, admin API, crash recovery;
all through real HTTP on loopback in front of a demo worker."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.router.test_route import RouterProcess, wait_until
from tests.server.conftest import start_server
from tokenmill.cli.route import open_gateway
from tokenmill.router.gateway_config import load_gateway_config
from tokenmill.router.ledger import Ledger

ADMIN = "admin-secret-for-tests"
CONFIG = """
ledger: usage.db
usage_checkpoint_s: 0.2
prices:
  demo: {prompt: 1.0, completion: 2.0}
teams:
  alpha: {models: [demo], priority: 5}
  beta: {models: [demo], priority: 0}
  capped: {models: [demo], requests_per_minute: 2}
  elsewhere: {models: [another-model]}
  metered: {tokens_per_minute: 100}
  budgeted: {budget: {tokens: 70, period: day}}
"""


@pytest.fixture
def gateway(worker, tmp_path: Path):
    config = tmp_path / "gateway.yaml"
    config.write_text(CONFIG)
    keys = {
        team: create_key(config, team)
        for team in ("alpha", "beta", "capped", "elsewhere", "metered", "budgeted")
    }
    router = start_gateway(worker, config)
    yield type(
        "G", (), {"url": router.url, "router": router, "keys": keys, "config": config, "worker": worker}
    )
    router.stop()


def start_gateway(worker, config: Path) -> RouterProcess:
    return RouterProcess(
        worker.url, extra=("--gateway-config", str(config)), env={"TOKENMILL_ADMIN_KEY": ADMIN}
    )


def create_key(config: Path, team: str) -> str:
    """A new key for ``team`` in ``config``'s ledger, made as ``tokenmill keys create`` makes it, in
    this process (a CLI process per key cost a second each; the command's own tests are in
    tests/cli/test_keys.py)."""
    gateway = open_gateway(load_gateway_config(config))
    try:
        return gateway.create_key(team)[0]
    finally:
        gateway.ledger.close()


def chat(url: str, key: str | None, **body) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    payload = {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **body}
    return httpx.post(f"{url}/v1/chat/completions", json=payload, headers=headers, timeout=30)


def usage_rows(gateway, team: str, settled: bool = True) -> list[dict]:
    """The team's usage rows as another process reads them; ``settled``: once none is in flight
    (a closing is committed at the end of the gateway's turn, just after the response ends)."""
    deadline = time.monotonic() + 5
    while True:
        with contextlib.closing(sqlite3.connect(gateway.config.parent / "usage.db")) as db:
            db.row_factory = sqlite3.Row
            rows = [dict(r) for r in db.execute("SELECT * FROM usage WHERE team = ? ORDER BY id", (team,))]
        if not settled or all(r["status"] != "in_flight" for r in rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.01)


@contextlib.contextmanager
def long_stream(gateway, team: str, tokens: int) -> Iterator[Iterator[str]]:
    """A streamed request of ``tokens`` tokens, open and past its first line: still in flight."""
    body = {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": tokens,
            "ignore_eos": True, "stream": True}  # fmt: skip
    headers = {"authorization": f"Bearer {gateway.keys[team]}"}
    with httpx.stream(
        "POST", f"{gateway.url}/v1/chat/completions", json=body, headers=headers, timeout=30
    ) as r:
        lines = r.iter_lines()
        next(lines)
        yield lines


def admin(method: str, url: str, path: str, **kw) -> httpx.Response:
    return httpx.request(
        method, f"{url}{path}", headers={"authorization": f"Bearer {ADMIN}"}, timeout=30, **kw
    )


def test_keys_name_teams_and_teams_name_their_models(gateway):
    assert chat(gateway.url, None).status_code == 401
    assert chat(gateway.url, "tm-not-a-key").status_code == 401
    ok = chat(gateway.url, gateway.keys["alpha"])
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
    refused = chat(gateway.url, gateway.keys["elsewhere"])
    error = refused.json()["error"]
    assert refused.status_code == 403 and error["param"] == "model" and "another-model" in error["message"]
    missing = chat(gateway.url, gateway.keys["alpha"], model=None)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "model"


def test_every_request_is_in_the_ledger_and_usage_is_per_team(gateway):
    alpha, beta = gateway.keys["alpha"], gateway.keys["beta"]
    whole = chat(gateway.url, alpha, metadata={"feature": "search"})
    streamed = []
    with httpx.stream(
        "POST",
        f"{gateway.url}/v1/chat/completions",
        json={
            "model": "demo",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 5,
            "stream": True,
        },
        headers={"authorization": f"Bearer {alpha}"},
        timeout=30,
    ) as r:
        streamed = [line for line in r.iter_lines() if line]
    assert all('"usage"' not in line for line in streamed)  # it did not ask: the usage chunk is not passed
    assert streamed[-1] == "data: [DONE]"
    chat(gateway.url, beta)
    rows = usage_rows(gateway, "alpha")
    assert [r["status"] for r in rows] == ["ok", "ok"] and json.loads(rows[0]["tags"]) == {
        "feature": "search"
    }
    assert (
        rows[1]["completion_tokens"] == 5
        and rows[0]["prompt_tokens"] == whole.json()["usage"]["prompt_tokens"]
    )
    assert rows[0]["cost"] == pytest.approx((rows[0]["prompt_tokens"] * 1.0 + 4 * 2.0) / 1e6)
    mine = httpx.get(
        f"{gateway.url}/v1/usage", headers={"authorization": f"Bearer {alpha}"}, timeout=30
    ).json()
    assert [(r["team"], r["requests"]) for r in mine["data"]] == [("alpha", 2)]
    spy = httpx.get(
        f"{gateway.url}/v1/usage?team=alpha", headers={"authorization": f"Bearer {beta}"}, timeout=30
    )
    assert spy.status_code == 403 and spy.json()["error"]["param"] == "team"  # its own usage only
    own = httpx.get(
        f"{gateway.url}/v1/usage?team=beta", headers={"authorization": f"Bearer {beta}"}, timeout=30
    )
    assert [r["team"] for r in own.json()["data"]] == ["beta"]
    everyone = admin("GET", gateway.url, "/v1/usage?group_by=day").json()["data"]
    assert {r["team"] for r in everyone} == {"alpha", "beta"}
    bad = admin("GET", gateway.url, "/v1/usage?group_by=week")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "group_by"


def test_priority_is_the_teams_or_lower_never_higher(gateway):
    alpha = gateway.keys["alpha"]
    chat(gateway.url, alpha, priority=100)
    chat(gateway.url, alpha, priority=1)
    chat(gateway.url, alpha)
    rows = usage_rows(gateway, "alpha")
    assert [r["priority"] for r in rows] == [5, 1, 5]


def test_over_a_limit_is_a_429_naming_it_and_costs_nothing(gateway):
    capped = gateway.keys["capped"]
    assert [chat(gateway.url, capped).status_code for _ in range(2)] == [200, 200]
    third = chat(gateway.url, capped)
    assert third.status_code == 429 and int(third.headers["retry-after"]) >= 1
    assert third.json()["error"]["param"] == "requests_per_minute"
    assert len(usage_rows(gateway, "capped")) == 2  # the refused one cost nothing


def test_setting_a_team_again_through_the_admin_api_does_not_refill_its_limits(gateway):
    capped = gateway.keys["capped"]
    assert [chat(gateway.url, capped).status_code for _ in range(2)] == [200, 200]
    same = {"name": "capped", "models": ["demo"], "requests_per_minute": 2}
    assert admin("POST", gateway.url, "/admin/teams", json=same).status_code == 200
    third = chat(gateway.url, capped)
    assert third.status_code == 429 and third.json()["error"]["param"] == "requests_per_minute"
    assert len(usage_rows(gateway, "capped")) == 2


def test_a_batch_with_n_is_held_to_the_teams_minute_and_a_small_minute_needs_no_max_tokens(gateway):
    """The QA repro, through HTTP: 20 prompts × n 6 × max_tokens 100 against 2,000 tokens a minute
    and a day used 12,040 tokens; now it is refused, saying what max_tokens fits."""
    team = {"models": ["demo"], "tokens_per_minute": 2000, "budget": {"tokens": 2000, "period": "day"}}
    assert admin("POST", gateway.url, "/admin/teams", json={"name": "batcher", **team}).status_code == 200
    assert admin(
        "POST", gateway.url, "/admin/teams", json={"name": "small", "tokens_per_minute": 500}
    ).is_success
    keys = {
        t: admin("POST", gateway.url, "/admin/keys", json={"team": t}).json()["key"]
        for t in ("batcher", "small")
    }
    prompts = [f"Tell me about number {i}." for i in range(20)]
    body = {"model": "demo", "prompt": prompts, "max_tokens": 100, "n": 6, "ignore_eos": True}
    headers = {"authorization": f"Bearer {keys['batcher']}"}
    url = f"{gateway.url}/v1/completions"
    refused = httpx.post(url, json=body, headers=headers, timeout=30)
    error = refused.json()["error"]
    assert refused.status_code == 400 and error["param"] == "max_tokens", error
    fits = int(error["message"].split("lower max_tokens to ")[1].split()[0])
    assert httpx.post(url, json={**body, "max_tokens": fits}, headers=headers, timeout=60).status_code == 200
    again = httpx.post(url, json={**body, "max_tokens": fits}, headers=headers, timeout=30)
    assert again.status_code == 429
    (row,) = usage_rows(gateway, "batcher")
    assert row["prompt_tokens"] + row["completion_tokens"] <= 2000
    # A team whose minute is below default_max_tokens (1024) can still name no max_tokens.
    small = {"authorization": f"Bearer {keys['small']}"}
    plain = httpx.post(url, json={"model": "demo", "prompt": "Hi"}, headers=small, timeout=30)
    assert plain.status_code == 200, plain.text


def test_admin_api_creates_teams_and_keys_rotates_and_revokes(gateway):
    assert httpx.get(f"{gateway.url}/admin/teams", timeout=30).status_code == 401
    made = admin(
        "POST", gateway.url, "/admin/teams", json={"name": "gamma", "models": ["demo"], "priority": 2}
    )
    assert made.status_code == 200 and made.json()["priority"] == 2
    bad = admin("POST", gateway.url, "/admin/teams", json={"name": "delta", "pool": "fast"})
    assert bad.status_code == 400 and "pool" in bad.json()["error"]["message"]
    key = admin("POST", gateway.url, "/admin/keys", json={"team": "gamma", "label": "ci"}).json()
    assert chat(gateway.url, key["key"]).status_code == 200
    rotated = admin("POST", gateway.url, f"/admin/keys/{key['id']}/rotate").json()
    assert rotated["replaces"] == key["id"]
    assert (
        chat(gateway.url, key["key"]).status_code == 401
        and chat(gateway.url, rotated["key"]).status_code == 200
    )
    assert admin("POST", gateway.url, f"/admin/keys/{rotated['id']}/revoke").json()["revoked"] is not None
    assert chat(gateway.url, rotated["key"]).status_code == 401
    listed = admin("GET", gateway.url, "/admin/keys?team=gamma").json()["keys"]
    assert len(listed) == 2 and all("key" not in k and k["revoked"] for k in listed)
    assert admin("POST", gateway.url, "/admin/keys", json={"team": "nobody"}).status_code == 400
    assert admin("DELETE", gateway.url, "/admin/teams/gamma").status_code == 200


def test_a_key_revoked_by_the_cli_stops_working_on_a_running_gateway(gateway):
    alpha = gateway.keys["alpha"]
    assert chat(gateway.url, alpha).status_code == 200
    key_id = Ledger(gateway.config.parent / "usage.db").keys("alpha")[0].id  # (a Ledger recovers nothing)
    cmd = [
        sys.executable,
        "-m",
        "tokenmill.cli.main",
        "keys",
        "revoke",
        key_id,
        "--config",
        str(gateway.config),
    ]
    subprocess.run(cmd, capture_output=True, timeout=60, check=True)
    wait_until(
        lambda: chat(gateway.url, alpha).status_code == 401, "the revocation to take effect", timeout=5
    )


def test_a_killed_gateway_leaves_no_request_unrecorded(gateway):
    messages = [{"role": "user", "content": "Hi"}]
    body = {"model": "demo", "messages": messages, "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.stream(
        "POST",
        f"{gateway.url}/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {gateway.keys['beta']}"},
        timeout=30,
    ) as r:
        lines = r.iter_lines()
        received, since = 0, time.monotonic()
        while time.monotonic() - since < 1.0:  # several checkpoints (usage_checkpoint_s: 0.2)
            received += next(lines).startswith("data: ")
        os.kill(gateway.router.proc.pid, signal.SIGKILL)  # mid-stream, no cleanup
        gateway.router.proc.wait(10)
    restarted = start_gateway(gateway.worker, gateway.config)
    try:
        assert "1 requests a stopped gateway left in flight" in restarted.ready_line
        (row,) = usage_rows(gateway, "beta")
        assert row["status"] == "interrupted" and row["prompt_tokens"] > 0
        assert row["worker"] and gateway.worker.url.split(":")[-1] in row["worker"]  # it names its worker
        # What the client was sent up to the last checkpoint is charged too, not the prompt alone.
        assert 0 < row["completion_tokens"] < 900 and received > 1
        expected = (row["prompt_tokens"] * 1.0 + row["completion_tokens"] * 2.0) / 1e6  # demo's prices
        assert row["cost"] == pytest.approx(expected)
        headers = {"authorization": f"Bearer {gateway.keys['beta']}"}
        (total,) = httpx.get(f"{restarted.url}/v1/usage", headers=headers, timeout=30).json()["data"]
        assert total["cost"] == pytest.approx(row["cost"])  # what dollar budgets read agrees
    finally:
        restarted.stop()


def test_a_team_goes_to_its_pool_and_falls_back_only_while_that_pool_is_down(worker, tmp_path: Path):
    config = tmp_path / "gateway.yaml"
    config.write_text("teams:\n  fast: {pool: latency}\n  bulk: {pool: throughput}\n")
    fast, bulk = create_key(config, "fast"), create_key(config, "bulk")
    other = start_server("--worker-id", "throughput-worker")
    router = None
    try:
        router = RouterProcess(
            f"{worker.url}#latency",
            f"{other.url}#throughput",
            extra=("--gateway-config", str(config)),
            env={"TOKENMILL_ADMIN_KEY": ADMIN},
        )
        latency_name = worker.url.removeprefix("http://")
        assert {chat(router.url, fast).headers["x-tokenmill-worker"] for _ in range(3)} == {latency_name}
        assert {chat(router.url, bulk).headers["x-tokenmill-worker"] for _ in range(3)} == {
            "throughput-worker"
        }
        drained = admin("POST", router.url, "/admin/workers", json={"url": worker.url, "action": "drain"})
        assert drained.status_code == 200
        assert chat(router.url, fast).headers["x-tokenmill-worker"] == "throughput-worker"  # its pool is down
        assert (
            httpx.post(f"{router.url}/admin/workers", json={"url": worker.url}, timeout=30).status_code == 401
        )
    finally:
        if router is not None:
            router.stop()
        other.stop()


def test_when_workers_are_full_higher_priority_waits_less(tmp_path: Path):
    config = tmp_path / "gateway.yaml"
    config.write_text("teams:\n  premium: {priority: 10}\n  standard: {priority: 0}\n")
    premium, standard = create_key(config, "premium"), create_key(config, "standard")
    single = start_server("--max-num-seqs", "1")  # reports a concurrency limit of 1: the queue engages
    router = None
    try:
        router = RouterProcess(
            single.url, extra=("--gateway-config", str(config)), env={"TOKENMILL_ADMIN_KEY": ADMIN}
        )
        wait_until(lambda: router.status()["workers"][0]["slots"] == 1, "the worker's slots from its metrics")
        finished: list[str] = []

        def send(key: str, name: str, tokens: int) -> None:
            r = chat(router.url, key, max_tokens=tokens, ignore_eos=True)
            assert r.status_code == 200
            finished.append(name)

        blocker = threading.Thread(target=send, args=(standard, "blocker", 150))
        blocker.start()
        wait_until(
            lambda: router.status()["queues"].get("throughput", {}).get("in_flight") == 1, "the slot taken"
        )
        threads = [threading.Thread(target=send, args=(standard, f"standard-{i}", 8)) for i in range(3)]
        for t in threads:
            t.start()
        wait_until(lambda: router.status()["queues"]["throughput"]["waiting"] == 3, "three standard waiting")
        late = threading.Thread(target=send, args=(premium, "premium", 8))
        late.start()
        for t in [blocker, *threads, late]:
            t.join(60)
        # It came last and finished first: straight past the full queue into an overflow slot, and
        # the worker preempted the long standard request to seat it.
        assert finished[0] == "premium", finished
    finally:
        if router is not None:
            router.stop()
        single.stop()


def test_tokens_per_minute_and_budgets_through_http(gateway):
    metered, budgeted = gateway.keys["metered"], gateway.keys["budgeted"]
    too_big = chat(gateway.url, metered, max_tokens=120)
    assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "max_tokens"
    assert "lower max_tokens to 86 or less" in too_big.json()["error"]["message"]
    # "Hi" is estimated at 15 prompt tokens (14 with the template); a request is charged what it
    # used, its reservation refunded
    assert chat(gateway.url, metered, max_tokens=30).status_code == 200  # ~56 of 100 left
    assert chat(gateway.url, metered, max_tokens=40).status_code == 200  # ~2 left
    third = chat(gateway.url, metered, max_tokens=40)
    assert third.status_code == 429 and third.json()["error"]["param"] == "tokens_per_minute"
    assert 1 <= int(third.headers["retry-after"]) <= 60
    statuses = [chat(gateway.url, budgeted, max_tokens=4).status_code for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]  # 18 tokens used each, 19 reserved, 70 a day
    over = chat(gateway.url, budgeted, max_tokens=4)
    assert over.json()["error"]["param"] == "budget" and int(over.headers["retry-after"]) <= 86_400
    rows = usage_rows(gateway, "budgeted")
    assert sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows) <= 70


def test_chat_only_fields_do_not_lower_what_a_completion_reserves(gateway):
    """/v1/completions generates max_tokens and ignores chat's max_completion_tokens; the gateway
    reserved the latter, so max_completion_tokens: 1 let a team run past its minute's tokens."""
    headers = {"authorization": f"Bearer {gateway.keys['metered']}"}
    body = {"model": "demo", "prompt": "ROMEO:", "max_tokens": 120, "ignore_eos": True}
    for extra in ({}, {"max_completion_tokens": 1}, {"max_completion_tokens": 1, "messages": []}):
        r = httpx.post(f"{gateway.url}/v1/completions", json={**body, **extra}, headers=headers, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", (extra, r.text)
    # Sent with chat's field alone, a completion reserves what a request naming no max_tokens does.
    r = httpx.post(
        f"{gateway.url}/v1/completions",
        json={"model": "demo", "prompt": "ROMEO:", "max_completion_tokens": 1},
        headers=headers,
        timeout=30,
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 1


@pytest.mark.parametrize(
    ("request_body", "forwarded"),
    [
        # Only the priority to add: appended to the client's bytes as they are.
        (b'{"model": "demo", "max_tokens": 4}\n', b'{"model": "demo", "max_tokens": 4, "priority": 5}'),
        # A field the gateway strips, a usage chunk to ask for, a priority to lower, a max_tokens to
        # hold the request to what it reserved (alpha has no minute to fit: the default): re-encoded.
        (b'{"model": "demo", "metadata": {"a": "b"}, "max_tokens": 4}',
         {"model": "demo", "priority": 5, "max_tokens": 4}),
        (b'{"model": "demo", "stream": true}', {"model": "demo", "stream": True, "priority": 5,
                                               "stream_options": {"include_usage": True},
                                               "max_tokens": 1024,
         "truncate_max_tokens": True}),
        (b'{"model": "demo", "priority": 2}', {"model": "demo", "priority": 2, "max_tokens": 1024,
         "truncate_max_tokens": True}),
        (b'{"model": "demo", "metadata": null}', {"model": "demo", "priority": 5, "max_tokens": 1024,
         "truncate_max_tokens": True}),
        (b'{"model": "demo", "max_tokens": null, "max_completion_tokens": null}',
         {"model": "demo", "priority": 5, "max_tokens": 1024, "max_completion_tokens": None,
         "truncate_max_tokens": True}),
        (b'{"model": "demo", "messages": [], "max_completion_tokens": 7}',
         {"model": "demo", "messages": [], "max_completion_tokens": 7, "priority": 5}),
        # "false" as a string: the worker must see a real boolean, so the usage chunk comes.
        (b'{"model": "demo", "stream": true, "stream_options": {"include_usage": "false"}, "max_tokens": 4}',
         {"model": "demo", "stream": True, "priority": 5, "stream_options": {"include_usage": True},
          "max_tokens": 4}),
        ('{"model": "demo"}'.encode("utf-16-be"), {"model": "demo", "priority": 5, "max_tokens": 1024,
         "truncate_max_tokens": True}),
    ],
)  # fmt: skip
def test_the_worker_gets_the_body_rewritten_only_where_it_must_be(tmp_path: Path, request_body, forwarded):
    from tokenmill.router.gateway import Gateway
    from tokenmill.router.gateway_config import load_gateway_config

    config = tmp_path / "gateway.yaml"
    config.write_text(CONFIG)
    gateway = Gateway(load_gateway_config(config))
    key, _ = gateway.create_key("alpha")
    headers = {"authorization": f"Bearer {key}"}
    admitted = gateway.admit(json.loads(request_body), request_body, headers, 10, 4)
    body = admitted.body
    if isinstance(forwarded, bytes):
        assert body == forwarded
    else:
        assert json.loads(body) == forwarded
    assert "authorization" not in headers and headers["x-tokenmill-tenant"] == "alpha"
    gateway.ledger.close()


def test_a_request_naming_no_max_tokens_is_answered_to_the_end_of_the_context(gateway):
    """The gateway sends its default max_tokens (1024); the demo worker's context (1024 tokens)
    leaves less after this prompt. The client named no limit, so it gets the answer cut at the
    context's end, not the 400 that a max_tokens of its own past the context gets."""
    content = "ROMEO " * 330
    r = chat(
        gateway.url, gateway.keys["alpha"], messages=[{"role": "user", "content": content}], max_tokens=None
    )
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= 1024
    r = chat(
        gateway.url, gateway.keys["alpha"], messages=[{"role": "user", "content": content}], max_tokens=1000
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_the_keys_cli_on_a_running_gateway_leaves_its_requests_in_flight_alone(gateway):
    """Opening the ledger to manage keys must not take the running gateway's requests for a dead
    gateway's (closed as interrupted, their prompts counted twice once they end)."""
    with long_stream(gateway, "beta", 600) as lines:
        (in_flight,) = usage_rows(gateway, "beta", settled=False)
        assert in_flight["status"] == "in_flight"
        Ledger(gateway.config.parent / "usage.db").keys("beta")  # what `tokenmill keys list` does
        assert usage_rows(gateway, "beta", settled=False)[0]["status"] == "in_flight"
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    (row,) = usage_rows(gateway, "beta")
    assert (row["status"], row["completion_tokens"]) == ("ok", 600)
    headers = {"authorization": f"Bearer {gateway.keys['beta']}"}
    mine = httpx.get(f"{gateway.url}/v1/usage", headers=headers, timeout=30).json()["data"]
    assert mine[0]["prompt_tokens"] == row["prompt_tokens"] and mine[0]["requests"] == 1


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "demo", "priority": -(2**70)}, "priority"),  # lower is allowed, but not past int32
        ({"model": "demo", "priority": 2**31}, "priority"),
        ({"model": "demo\ud800"}, "model"),  # a lone surrogate: no UTF-8 store can hold it
    ],
)
def test_values_the_workers_or_the_ledger_cannot_hold_are_refused(tmp_path: Path, body, param):
    from tokenmill.router.gateway import Gateway, GatewayError
    from tokenmill.router.gateway_config import load_gateway_config

    config = tmp_path / "gateway.yaml"
    config.write_text(CONFIG.replace("models: [demo], priority: 5", "priority: 5"))
    gateway = Gateway(load_gateway_config(config))
    key, _ = gateway.create_key("alpha")
    raw = json.dumps(body).encode()
    with pytest.raises(GatewayError) as refused:
        gateway.admit(json.loads(raw), raw, {"authorization": f"Bearer {key}"}, 10, 4)
    assert (refused.value.status, refused.value.param) == (400, param)
    assert gateway.ledger.rows() == []  # no row, nothing reserved


def test_a_second_gateway_on_the_same_ledger_exits_naming_it_and_changes_nothing(gateway):
    with long_stream(gateway, "beta", 900) as lines:
        cmd = [sys.executable, "-m", "tokenmill.cli.main", "route", "--port", "0", "--worker",
               gateway.worker.url, "--gateway-config", str(gateway.config)]  # fmt: skip
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and "in use by another running gateway" in " ".join(
            second.stderr.split()
        )
        assert usage_rows(gateway, "beta", settled=False)[0]["status"] == "in_flight"  # not recovered
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert usage_rows(gateway, "beta")[0]["status"] == "ok"
