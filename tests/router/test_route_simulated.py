"""``tokenmill route --policy kv`` over a fleet of simulated workers (the real scheduler, prefix cache
and KV events; step times from a profile, no model run)."""

from __future__ import annotations

import httpx
import pytest

from tests.router.test_route import RouterProcess, _known_blocks, wait_until
from tests.server.conftest import start_server

FLEET = 4


@pytest.fixture(scope="module")
def fleet():
    workers = [start_server("--runner", "simulated", "--worker-id", f"sim-{i}") for i in range(FLEET)]
    yield workers
    for w in workers:
        w.stop()


def test_each_tenants_system_prompt_lands_where_its_blocks_are_and_hits_are_predicted_exactly(fleet):
    router = RouterProcess(*(w.url for w in fleet), policy="kv", extra=("--tokenizer", "demo"))
    try:
        wait_until(lambda: all(w["kv_events"] for w in router.status()["workers"]), "KV event streams")
        hits_before = sum(w.metric("tokenmill_prefix_cache_hits_total") for w in fleet)
        for tenant in ("legal", "support", "search"):
            system = f"{tenant.upper()} TEAM. Answer for us and cite the policy you rely on. " * 12
            landed = []
            # A worker may already hold an earlier tenant's blocks: wait for this prompt's own.
            known_before = {w["url"]: w["kv_blocks_known"] for w in router.status()["workers"]}
            for i in range(5):
                messages = [{"role": "system", "content": system}, {"role": "user", "content": f"Case {i}"}]
                r = httpx.post(
                    f"{router.url}/v1/chat/completions",
                    json={"messages": messages, "max_tokens": 4},
                    timeout=30,
                )
                assert r.status_code == 200, r.text
                landed.append(r.headers["x-tokenmill-worker"])
                holder = next(w["url"] for w in router.status()["workers"] if w["name"] == landed[0])
                before = known_before[holder]
                wait_until(lambda h=holder, b=before: _known_blocks(router, h) > b, "the holder's KV events")
            assert len(set(landed)) == 1, f"{tenant}: {landed}"
        status = router.status()
        assert status["decisions"] == {"kv_miss": 3, "kv_hit": 12}
        measured = sum(w.metric("tokenmill_prefix_cache_hits_total") for w in fleet) - hits_before
        assert status["predicted_hit_tokens"] == measured > 0
    finally:
        router.stop()
