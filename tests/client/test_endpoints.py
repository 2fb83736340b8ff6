"""Several endpoints: least in-flight, ejection with growing time-outs, session affinity."""

from __future__ import annotations

import pytest

from tests.client.conftest import FakeClock
from tokenmill.client.endpoints import EndpointSet, _rendezvous


def test_requests_go_to_the_least_loaded_endpoint_and_ties_take_turns():
    ends = EndpointSet(["http://a:1", "http://b:1", "http://c:1"])
    picked = [ends.pick().url for _ in range(6)]
    assert sorted(picked) == sorted(["http://a:1", "http://b:1", "http://c:1"] * 2)
    a = ends.endpoints[0]
    ends.done(a, failed=False)
    assert ends.pick() is a


def test_an_unreachable_endpoint_is_ejected_and_comes_back_with_growing_timeouts():
    clock = FakeClock()
    ends = EndpointSet(["http://a:1", "http://b:1"], eject_s=1.0, clock=clock)
    a, b = ends.endpoints
    b.in_flight += 1
    ends.done(b, failed=True, unreachable=True)
    assert ends.healthy_count() == 1
    assert all(ends.pick() is a for _ in range(3))
    clock.now = 1.01
    assert ends.healthy_count() == 2
    b.in_flight += 1
    ends.done(b, failed=True, unreachable=True)  # failed again as it came back
    assert b.ejected_until == pytest.approx(clock.now + 2.0)  # the second ejection in a row doubles
    clock.now = 3.02
    b.in_flight += 1
    ends.done(b, failed=False)  # a success resets the doubling
    b.in_flight += 1
    ends.done(b, failed=True, unreachable=True)
    assert b.ejected_until == pytest.approx(clock.now + 1.0)


def test_5xx_ejects_only_after_several_in_a_row():
    ends = EndpointSet(["http://a:1"], eject_after=3)
    e = ends.endpoints[0]
    for _ in range(2):
        e.in_flight += 1
        ends.done(e, failed=True)
    assert ends.healthy_count() == 1
    e.in_flight += 1
    ends.done(e, failed=True)
    assert ends.healthy_count() == 0
    assert ends.pick() is e  # every endpoint ejected: the one back first is tried anyway


def test_a_session_keeps_to_its_endpoint_until_that_one_is_much_busier():
    ends = EndpointSet([f"http://w{i}:1" for i in range(4)], affinity_slack=2)
    home = ends.pick(session="conversation-7")
    assert all(ends.pick(session="conversation-7") is home for _ in range(2))
    # home now runs 3, the others 0: past the slack the session spills over
    assert ends.pick(session="conversation-7") is not home


def test_an_endpoint_answering_429_is_passed_over_for_its_retry_after_but_not_ejected():
    """Before: a 429 did not count, and the endpoint refusing at once had the fewest in flight, so
    least in-flight sent it every retry while another endpoint sat idle."""
    clock = FakeClock()
    ends = EndpointSet(["http://a:1", "http://b:1"], clock=clock)
    a, b = ends.endpoints
    b.in_flight += 1  # b is busy serving; a refuses at once
    picked = ends.pick()
    assert picked is a
    ends.done(a, failed=False, busy_for=1.0)
    assert ends.healthy_count() == 2  # not ejected
    assert all(ends.pick() is b for _ in range(3))
    at_home_on_a = next(s for s in map(str, range(100)) if _rendezvous(s, a.url) > _rendezvous(s, b.url))
    assert ends.pick(session=at_home_on_a) is b  # sessions too keep off it meanwhile
    clock.now = 1.01
    assert ends.pick() is a  # its Retry-After passed
    ends.done(a, failed=False, busy_for=1.0)
    ends.done(b, failed=False, busy_for=5.0)
    assert ends.pick() in (a, b)  # all busy: one is used anyway, the caller is not failed


def test_bad_urls_are_named():
    with pytest.raises(ValueError, match="ftp://x"):
        EndpointSet(["ftp://x"])
    for url in ("http://a:99999", "http://a:0", "http://a:x"):
        with pytest.raises(ValueError, match=f"base_url '{url}' is invalid: .*port 1 to 65535"):
            EndpointSet([url])
    with pytest.raises(ValueError, match="twice"):
        EndpointSet(["http://a:1", "http://a:1/"])
    with pytest.raises(ValueError, match="at least one"):
        EndpointSet([])
