"""A fleet whose workers serve different models: a request goes only to workers that serve its
``model`` (learned from their /v1/models by the health checks), and a model none serves is
OpenAI's 404 ``model_not_found`` naming the models the fleet serves, through the plain router and
the gateway alike."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.router.test_gateway import ADMIN, create_key
from tests.router.test_route import RouterProcess, wait_until
from tests.server.conftest import start_server
from tokenmill.router.workers import WorkerPool


@pytest.fixture(scope="module")
def fleet():
    demo, foo = start_server(), start_server("--served-model-name", "foo")
    yield demo, foo
    demo.stop()
    foo.stop()


def name(worker) -> str:
    return worker.url.removeprefix("http://")


def complete(url: str, headers: dict[str, str] | None = None, **body) -> httpx.Response:
    payload = {"prompt": "Hi", "max_tokens": 2, **body}
    return httpx.post(f"{url}/v1/completions", json=payload, headers=headers, timeout=30)


def models_known(router: RouterProcess) -> bool:
    return all(w["models"] is not None for w in router.status()["workers"])


@pytest.mark.parametrize("policy", ["round_robin", "prefix"])
def test_a_request_goes_only_to_workers_that_serve_its_model(fleet, policy):
    demo, foo = fleet
    router = RouterProcess(demo.url, foo.url, policy=policy)
    try:
        wait_until(lambda: models_known(router), "the workers' models")
        status = {w["url"]: w["models"] for w in router.status()["workers"]}
        assert status == {demo.url: ["demo"], foo.url: ["foo"]}
        for model, worker in (("foo", foo), ("demo", demo)) * 3:
            r = complete(router.url, model=model, user="alice")  # a session does not pull it elsewhere
            assert r.status_code == 200 and r.headers["x-tokenmill-worker"] == name(worker), r.text
        anywhere = {complete(router.url).headers["x-tokenmill-worker"] for _ in range(4)}
        assert anywhere <= {name(demo), name(foo)} and (policy != "round_robin" or len(anywhere) == 2)
        missing = complete(router.url, model="bar")
        error = missing.json()["error"]
        assert missing.status_code == 404 and (error["code"], error["param"]) == ("model_not_found", "model")
        assert "'bar'" in error["message"] and "'demo', 'foo'" in error["message"]
        assert sum(w["routed"] for w in router.status()["workers"]) == 10  # the 404 cost no worker
    finally:
        router.stop()


def test_behind_the_gateway_a_model_no_worker_serves_is_a_404_at_once(fleet, tmp_path: Path):
    demo, foo = fleet
    config = tmp_path / "gateway.yaml"
    config.write_text("ledger: usage.db\nteams:\n  all: {models: ['*']}\n")
    key = {"authorization": f"Bearer {create_key(config, 'all')}"}
    router = RouterProcess(
        demo.url, foo.url, extra=("--gateway-config", str(config)), env={"TOKENMILL_ADMIN_KEY": ADMIN}
    )
    try:
        wait_until(lambda: models_known(router), "the workers' models")
        for _ in range(3):
            r = complete(router.url, key, model="foo")
            assert r.status_code == 200 and r.headers["x-tokenmill-worker"] == name(foo), r.text
        missing = complete(router.url, key, model="bar")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    finally:
        router.stop()


def test_workers_whose_models_are_not_known_take_any_model():
    pool = WorkerPool(
        ["http://10.0.0.1:8000#latency", "http://10.0.0.2:8000#throughput", "http://10.0.0.3:8000"]
    )
    a, b, c = pool.workers
    assert pool.serves("foo") is True  # nothing known yet: every worker may serve it
    pool.set_models(a, frozenset({"demo"}))
    pool.set_models(b, frozenset({"foo"}))
    assert [w.url for w in pool.available("latency", "foo")] == [c.url]  # c: not known, of no pool
    pool.set_models(c, frozenset({"demo"}))
    # The latency pool serves no foo: a request for it falls back to the worker that does.
    assert pool.available("latency", "foo") == [b]
    assert pool.available("latency", None) == [a, c]
    assert (pool.serves("foo"), pool.serves("bar")) == (True, False)
    assert pool.served_models() == ["demo", "foo"]
    pool.drain(b.url)
    assert pool.serves("foo") is False and pool.available("throughput", "foo") == []
    for w in (a, c):
        pool.drain(w.url)
    assert pool.serves("demo") is None  # no worker at all: that is a 503, not a 404
