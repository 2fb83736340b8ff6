"""Fixtures of the client tests: a fake clock, and two simulated workers of 8 slots each."""

from __future__ import annotations

import pytest

from tests.server.conftest import start_server


class FakeClock:
    """A clock the test moves by hand (``clock.now += 1.0``)."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def fleet():
    """Two simulated workers (the real scheduler, step times from a profile) named sim-0 and sim-1."""
    workers = [
        start_server("--runner", "simulated", "--max-num-seqs", "8", "--worker-id", f"sim-{i}")
        for i in range(2)
    ]
    yield workers
    for w in workers:
        w.stop()
