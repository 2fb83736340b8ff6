"""Fixtures the router's tests share."""

from __future__ import annotations

import pytest

from tests.server.conftest import start_server


@pytest.fixture(scope="module")
def worker():
    """A demo-model worker on a loopback port, one per test module that asks for it."""
    w = start_server()
    yield w
    w.stop()
