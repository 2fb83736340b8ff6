"""``tokenmill route status``: readable in 80 columns (a pipe's width) as well as in a wide one."""

from __future__ import annotations

import pytest

from tests.cli.test_keys import run
from tests.router.test_route import RouterProcess, wait_until
from tests.server.conftest import start_server


@pytest.fixture(scope="module")
def router():
    workers = [start_server("--runner", "simulated", "--worker-id", f"status-{i}") for i in range(2)]
    router = RouterProcess(*(w.url for w in workers))
    try:
        wait_until(lambda: all(w["models"] for w in router.status()["workers"]), "the workers' models")
        yield router
    finally:
        router.stop()
        for w in workers:
            w.stop()


@pytest.mark.parametrize("columns", [80, 200])
def test_every_worker_and_figure_is_shown_whole(router, columns: int):
    shown = run("route", "status", router.url, columns=columns)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert max(len(line) for line in lines) <= columns
    for worker in router.status()["workers"]:  # (in 80 columns the headers were cut to "work…")
        assert worker["name"] in shown.stdout
    for label in ("tokens in flight", "tokens routed", "cached tokens predicted", "models"):
        assert sum(label in line for line in lines) == 1, (label, shown.stdout)
    assert "demo" in shown.stdout  # the models each worker serves
